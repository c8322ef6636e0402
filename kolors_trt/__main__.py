from kolors_trt.cli import main

raise SystemExit(main())
