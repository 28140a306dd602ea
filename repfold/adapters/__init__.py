"""The training side: adapter modules, ``insert``, adapter checkpoints."""
