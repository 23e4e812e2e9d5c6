"""Write format-v0 checkpoints with the code before the restructuring: run at commit a9ed274
(git worktree add /tmp/v0 a9ed274; cd /tmp/v0; PYTHONPATH=. python <this file> <out.pt>)."""
import copy
import sys

import torch

import lightning_precond as lp
torch.set_num_threads(1)
OPTS = {
    "SOAP": lambda ps: lp.SOAP(ps, lr=3e-3, precondition_frequency=4, max_preconditioner_dim=8),
    "Shampoo": lambda ps: lp.Shampoo(ps, lr=3e-3, precondition_frequency=4, start_preconditioning_step=4, max_preconditioner_dim=8),
    "KLShampoo": lambda ps: lp.KLShampoo(ps, lr=3e-3, precondition_frequency=4, max_preconditioner_dim=8),
    "KLSOAP": lambda ps: lp.KLSOAP(ps, lr=3e-3, precondition_frequency=4, max_preconditioner_dim=8),
    "EigenvalueCorrectedShampoo": lambda ps: lp.EigenvalueCorrectedShampoo(ps, lr=3e-3, precondition_frequency=4, max_preconditioner_dim=8),
}
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
def train(net, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 10, generator=gen); y = torch.randn(8, 3, generator=gen)
        opt.zero_grad(); ((net(x) - y) ** 2).mean().backward(); opt.step()
out = {}
for name, make in OPTS.items():
    net = model(); opt = make(net.parameters())
    train(net, opt, 10, 1)
    # deepcopy: torch.optim.Optimizer.state_dict() returns the live AdamW tensors.
    saved = copy.deepcopy({"model": net.state_dict(), "optimizer": opt.state_dict()})
    train(net, opt, 10, 2)
    out[name] = {"saved": saved, "continued": {k: v.clone() for k, v in net.state_dict().items()}}
torch.save(out, sys.argv[1])
