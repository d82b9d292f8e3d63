"""How a stage becomes a KFP component: a lightweight Python component on the project's image.

The image has this project installed, so nothing is pip-installed at run time; the component's body
is a one-line call into its stage's `run`. `CLIPFLOW_IMAGE` at compile time overrides the image.
`kfp.local` runs the same functions on this interpreter.
"""

import functools
import os

from kfp import dsl

from components.common.platform import COMPONENT_IMAGE

IMAGE = os.environ.get("CLIPFLOW_IMAGE", COMPONENT_IMAGE)
component = functools.partial(dsl.component, base_image=IMAGE, install_kfp_package=False)
