from asyncps.cli.main import main

raise SystemExit(main())
