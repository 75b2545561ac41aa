import sys

from remora.snapshotter.fs.daemon import main

sys.exit(main())
