from onnxlr.cli import main

raise SystemExit(main())
