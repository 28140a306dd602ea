"""The shared core: the affine algebra, region finding and planning, the fold driver."""
