from setuptools import setup

setup(cffi_modules=["csi_vduse/_native_build.py:ffibuilder"])
