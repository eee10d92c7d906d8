from bloom_server.cli import main

raise SystemExit(main())
