"""ftcot-ray: Fine-tune-CoT (Ho, Schmid & Yun, ACL 2023) as a Ray application."""

__version__ = "0.1.0"
