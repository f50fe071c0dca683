from scanwatch.cli import main

raise SystemExit(main())
