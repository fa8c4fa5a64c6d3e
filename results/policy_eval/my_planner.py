# my_planner.py: follow the route at 10 m/s, stop for anyone in the way
import numpy as np


class RouteFollower:
    scene_view = True  # act() gets a closedloop SceneView instead of the ego observation

    def reset(self, seed):
        self.cruise = 10.0  # m/s

    def act(self, view):
        x, y, heading, vx, vy = view.states[view.sdc]
        forward, left = np.array([np.cos(heading), np.sin(heading)]), np.array([-np.sin(heading), np.cos(heading)])
        # Pure pursuit of the route point 10 m beyond the nearest one.
        ahead = view.route[np.linalg.norm(view.route - [x, y], axis=1).argmin() :]
        travelled = np.r_[0, np.cumsum(np.linalg.norm(np.diff(ahead, axis=0), axis=1))]
        target = ahead[min(np.searchsorted(travelled, 10.0), len(ahead) - 1)] - [x, y]
        curvature = 2 * (target @ left) / max(target @ target, 1.0)
        # Anyone within 2 m of our line and 25 m ahead: stop.
        rel = view.states[:, :2] - [x, y]
        blocked = view.valid & (rel @ forward > 0) & (rel @ forward < 25) & (np.abs(rel @ left) < 2.0)
        blocked[view.sdc] = False
        target_speed = 0.0 if blocked.any() else self.cruise
        return [np.clip(target_speed - np.hypot(vx, vy), -6.0, 2.0), curvature]
