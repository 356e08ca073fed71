"""The ehap-fx passes: each is a function ``GraphModule -> PassResult`` with a PassBase wrapper."""
