"""Where limiter state lives: in this process (``memory``); Redis comes in its own module."""
