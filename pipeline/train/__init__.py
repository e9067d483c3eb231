"""Training the embedded ``demo`` model (``python -m pipeline.train.demo``) on procedurally generated video."""
