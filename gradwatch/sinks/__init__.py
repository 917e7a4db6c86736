"""Where findings and figures go besides the session's own alert list."""
