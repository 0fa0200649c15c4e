"""Pure maths of NV attention: no module state, torch only (docs/MATH.md).

``prior`` (base distribution, streaming estimate), ``latent`` (the posterior an NVIB returns),
``masks`` (every mask convention and masked softmax), ``sampling`` (log-space Gamma / Dirichlet),
``kl`` (the KL regularisers), ``keyform`` (per-key terms of denoising attention, cache form),
``rope`` (rotary helpers), ``checks`` (argument checks).
"""
