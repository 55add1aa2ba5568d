"""``python -m shimv2.stress``: the stress tool's first name, kept working.

The tool is shimv2.tools.stress; this forwards to it and is never imported
by the runtime.
"""

import sys

from shimv2.tools.stress import main

if __name__ == "__main__":
    sys.exit(main())
