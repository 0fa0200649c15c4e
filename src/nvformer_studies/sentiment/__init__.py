"""Out-of-domain sentiment: a review classifier fine-tuned on one domain, regularised on six others."""
