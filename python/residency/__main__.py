from residency.cli import main

raise SystemExit(main())
