"""Test double of rknn-toolkit-lite2's ``rknnlite`` package (see ``api.py``)."""
