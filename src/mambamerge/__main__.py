from mambamerge.cli.main import main

raise SystemExit(main())
