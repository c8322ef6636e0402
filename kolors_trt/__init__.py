"""kolors-trt: TensorRT deployment toolkit for Kolors + IP-Adapter-Plus."""
__version__ = "0.1.0"
