"""The compiled fast path (workers/_fastpath.pyx) is optional: where Cython,
a C compiler or the Python headers are missing, the install goes on without
it and the workers run the pure-Python packet path."""
from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # only with --no-build-isolation and no Cython: the pyproject build always has it
    print("warning: Cython is missing, dnsrouter.workers._fastpath is not built")
    extensions = []
else:
    extensions = cythonize(
        # optional: a compile or link error is a warning, not a failed install
        [Extension("dnsrouter.workers._fastpath", ["workers/_fastpath.pyx"], optional=True)],
        language_level=3, quiet=True)

setup(ext_modules=extensions)
