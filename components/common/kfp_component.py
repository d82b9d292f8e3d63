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


def component(func=None, *, name: str = ""):
    """`dsl.component` on the project's image. `name` is the component's KFP name (and so its task's key in the
    DAG) when that cannot be the function's name: the filter stage's is `filter`, a builtin in Python, so its
    function is `filter_pairs` and its KFP name `filter`."""
    if func is None:
        return functools.partial(component, name=name)
    op = dsl.component(func, base_image=IMAGE, install_kfp_package=False)
    if name:
        op.name = op.component_spec.name = name
    return op
