"""The jobs website edge: HTTP with a wall-clock deadline, the wire format, and the client."""
