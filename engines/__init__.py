"""kolors_trt.engines"""
