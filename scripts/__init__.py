"""Tools around the product: thin command lines over the harness package."""
