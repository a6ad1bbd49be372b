"""What the stage scripts share, one place each: config, prompts, model loading, model files, logging."""
