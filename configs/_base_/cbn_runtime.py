# Shared fragment of every CBN config (not a full config): imports mmcbn,
# which registers the CBN norm layer and CBNHook, and adds CBNHook, which
# gives every CBN layer the runner's iteration (burn-in and window boundaries
# follow runner.iter, also after --resume) and converts a burn-in given in
# epochs with the train dataloader's length.
#
# CBN configs inherit it as a second _base_ next to their model file instead
# of assigning custom_hooks themselves: a child's list would silently replace
# a base's custom_hooks, whereas a model base that defines custom_hooks or
# custom_imports too makes mmengine stop with "Duplicate key is not allowed
# among bases", so no base hook can be lost unnoticed.
custom_imports = dict(imports=['mmcbn'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook')]
