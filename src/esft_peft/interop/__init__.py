"""Files, the Hugging Face Hub and the ESFT authors' adapter format."""
