"""What the stage scripts share, one place each: config, prompts, model loading, model files, logging.

torch 2.13 imports bitsandbytes while torch itself is imported (a device-backend plugin), and its
CPU backend then logs that the optional `kernels` package (which would fetch code from a hub) is
missing. The built-in CPU path works without it, so that notice is dropped here, before any torch.
"""
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
