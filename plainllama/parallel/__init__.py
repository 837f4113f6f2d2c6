"""Several processes running one model: tensor parallelism on torch.distributed.

ranks.py joins the process group (torchrun's environment), slicing.py cuts each rank's part of the
checkpoint, tensor_parallel.py builds the rank's model and says where the sums go, launch.py starts
N local ranks for `plainllama ... --tp N`.
"""
