"""Importing the package stays light: heavy libraries load when first used (as torchao checks)."""
import subprocess
import sys


def test_import_does_not_pull_heavy_libraries():
    code = ("import sys, midl_convert; heavy = ('timm', 'transformers', 'accelerate', 'matplotlib', 'datasets', 'typer'); "
            "print(','.join(m for m in heavy if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
