"""ffcv-imagenet: ILSVRC2012 -> .beton writer, FFCV training engine for ResNets, time-to-accuracy reports.

Nothing is imported here on purpose: `import ffcv_imagenet` must stay instant (start-up time is part
of time-to-accuracy); subcommands import what they need.
"""

__version__ = "0.1.0"
