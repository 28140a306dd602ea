"""Frontends: torch.fx, torch.export (as ATen -> torch graphs), ONNX with its streaming I/O, tracing."""
