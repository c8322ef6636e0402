"""kolors_trt.runtime"""
