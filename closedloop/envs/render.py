"""RGB frames of simulated scenes (road graph, boxes coloured by state, traffic lights)."""

from __future__ import annotations

import numpy as np

from closedloop.constants import is_road_edge, light_is_red, light_is_yellow
from closedloop.envs.core import SimState


def render_state(
    state: SimState, scenario: int = 0, size: int = 512, radius: float = 60.0, ghosts: bool = False
) -> np.ndarray:
    """An ``[size, size, 3]`` uint8 frame centred on the SDC: road points, light stop points
    (red/yellow/green), agent boxes (SDC dark blue, controlled blue, logged grey), and
    optionally the logged boxes as ghosts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from closedloop.envs.events import agent_corners

    b, t = state.batch, state.t
    fig = Figure(figsize=(size / 100, size / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_facecolor("#f4f4f0")
    road = b.road_xyz[scenario, b.road_mask[scenario], :2].cpu().numpy()
    codes = b.road_type[scenario, b.road_mask[scenario]].cpu().numpy()
    edge = is_road_edge(codes)
    ax.scatter(road[~edge, 0], road[~edge, 1], s=0.3, c="#9db4c0")
    ax.scatter(road[edge, 0], road[edge, 1], s=0.6, c="#222222")
    if bool(b.light_mask[scenario].any()):
        stops = b.light_stop_point[scenario, b.light_mask[scenario], :2].cpu().numpy()
        states = b.light_state[scenario, b.light_mask[scenario], t].cpu().numpy()
        colors = np.where(light_is_red(states), "#d62828", np.where(light_is_yellow(states), "#f4a261", "#2a9d2a"))
        ax.scatter(stops[:, 0], stops[:, 1], s=14, c=colors)
    corners = agent_corners(state)[scenario].cpu().numpy()
    valid = (state.valid[scenario, :, t] & b.agent_mask[scenario]).cpu().numpy()
    controlled = state.controlled[scenario].cpu().numpy()
    sdc = b.is_sdc[scenario].cpu().numpy()
    if ghosts:
        log = b.agent_xyz[scenario, :, t, :2].cpu().numpy()
        ax.scatter(log[valid, 0], log[valid, 1], s=4, c="#999999", alpha=0.5)
    for a in np.flatnonzero(valid):
        color = "#1d3557" if sdc[a] else "#457b9d" if controlled[a] else "#a0a0a0"
        ax.fill(corners[a, :, 0], corners[a, :, 1], color=color, alpha=0.85)
    centre = state.pose[scenario, int(np.flatnonzero(sdc)[0]) if sdc.any() else 0, t, :2].cpu().numpy()
    ax.set_xlim(centre[0] - radius, centre[0] + radius)
    ax.set_ylim(centre[1] - radius, centre[1] + radius)
    ax.set_aspect("equal")
    ax.axis("off")
    canvas.draw()
    frame = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return frame


def state_from_rollout(scenario, object_ids, trajectory, device: str = "cpu"):
    """A finished :class:`SimState` whose controlled agents follow ``trajectory``
    ``[A, 80, 4]`` (one rollout in the ``closedloop rollout`` format, world frame)."""
    import dataclasses

    import torch

    from closedloop.data.batch import collate_scenarios
    from closedloop.envs.core import History, reset
    from closedloop.metrics.wosac import check_rollouts

    ordered = check_rollouts(scenario, np.asarray(object_ids), np.asarray(trajectory)[None])[0]
    batch = collate_scenarios([scenario]).to(device)
    state = reset(batch)
    agents = torch.nonzero(state.controlled[0]).squeeze(-1)
    traj = torch.as_tensor(ordered, dtype=torch.float64, device=device)
    cur = batch.current_time_index
    pose, z = state.history.pose.clone(), state.history.z.clone()
    origin = batch.origin[0].to(device)
    pose[0, agents, cur + 1 :, 0:2] = (traj[..., :2] - origin).to(pose.dtype)
    pose[0, agents, cur + 1 :, 2] = traj[..., 3].to(pose.dtype)
    z[0, agents, cur + 1 :] = traj[..., 2].to(z.dtype)
    history = History(pose, z, state.history.valid, head=state.num_steps - 1)
    return dataclasses.replace(state, history=history, t=state.num_steps - 1)


def write_animation(frames: list[np.ndarray], path, fps: int = 10) -> None:
    """Write frames as a GIF (or MP4 when imageio's ffmpeg plugin is installed)."""
    import imageio.v2 as imageio

    path = str(path)
    if path.endswith(".mp4"):
        try:
            imageio.mimwrite(path, frames, fps=fps)
        except (ImportError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: writing MP4 needs imageio-ffmpeg ({err}); write a .gif instead") from None
    else:
        imageio.mimwrite(path, frames, duration=1000 / fps, loop=0)
