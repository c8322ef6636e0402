def main(argv=None):
    import kolors_trt.runtime.spec as s; print(s.__file__); return 0
