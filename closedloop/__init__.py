"""closedloop: closed-loop training and evaluation of traffic agents on WOMD scenarios."""

__version__ = "0.1.0"
