"""Bridges to other ecosystems: Hugging Face transformers export/import (hf.py)."""
