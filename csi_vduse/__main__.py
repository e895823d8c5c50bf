from csi_vduse.cli import main

raise SystemExit(main())
