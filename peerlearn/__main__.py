from peerlearn.cli import main

raise SystemExit(main())
