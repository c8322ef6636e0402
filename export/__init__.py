"""kolors_trt.export"""
