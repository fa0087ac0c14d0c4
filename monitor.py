"""What is watched while a run trains, beside the method: the kNN monitor (train.py --knn-every)
and the online linear probe (--online-probe)."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
import data
import evaluate


class KnnMonitor:
    """Weighted kNN top-1 (k=200, T=0.07, cosine: evaluate.py's functions) of the backbone's
    features of eval views, the labelled train split as the bank and the test split as queries."""

    def __init__(self, args, device, max_bytes=None):
        self.args, self.device = args, device
        self.splits = []  # [(images (N, 3, H, W) uint8, labels (N,))] for the bank and the queries
        for split, subset in (("train", args.knn_train_subset), ("test", args.knn_test_subset)):
            images, labels = data.load_images(args.dataset, split, args.data_dir, args.download,
                                              args.image_size, max_bytes, subset,
                                              f"--knn-{split}-subset")
            self.splits.append((images.to(device), labels.to(device)))
        self.num_classes = int(self.splits[0][1].max()) + 1

    @torch.no_grad()
    def features(self, backbone, batch_size=256):
        """[(bank features (N, F), labels (N,)), (query features, labels)], in eval mode."""
        feats = []
        a = self.args
        eval_batch = lambda x: augment.eval_batch(x, a.image_size, a.dataset)  # noqa: E731
        for images, labels in self.splits:
            batches = evaluate.DeviceBatches(images, labels, batch_size, eval_batch)
            feats.append(evaluate.extract_features(backbone, batches, self.device))  # (N, F), (N,)
        backbone.train()
        return feats

    def score(self, feats):
        (bank, bank_labels), (queries, query_labels) = feats
        scores = evaluate.knn_classify(bank, bank_labels, queries, self.num_classes, k=200,
                                       T=0.07)  # (N_test, C)
        return evaluate.topk_accuracy(scores, query_labels)  # [top-1, top-5]

    def __call__(self, backbone):
        return self.score(self.features(backbone))


PROBE_LR = 0.01  # --online-probe's: the best of 0.001 to 0.1 on the quickstart (RESULTS.md)


class OnlineProbe:
    """--online-probe: a linear classifier on the backbone's features of the global crops, detached
    (no gradient reaches the backbone), trained beside the method by its own SGD (lr PROBE_LR,
    momentum 0.9, no weight decay, constant) on features standardised by a BatchNorm without
    affine parameters (MAE's linear probe), so one lr suits any backbone and stage. Rows labelled
    -1 (unlabelled images) are left out of its loss, a mean over the global batch under DDP.
    Scored at the kNN points on the monitor's test features."""

    def __init__(self, feat_dim, num_classes, device, state=None):
        self.norm = nn.BatchNorm1d(feat_dim, affine=False).to(device)
        # zeros, not nn.Linear's random init: the run draws the same random numbers with or without
        self.weight = torch.zeros(num_classes, feat_dim, device=device,
                                  requires_grad=True)  # (C, F)
        self.bias = torch.zeros(num_classes, device=device, requires_grad=True)  # (C,)
        self.optimizer = torch.optim.SGD([self.weight, self.bias], lr=PROBE_LR, momentum=0.9)
        if state is not None:
            self.norm.load_state_dict(state["norm"])
            with torch.no_grad():
                self.weight.copy_(state["weight"])
                self.bias.copy_(state["bias"])
            self.optimizer.load_state_dict(state["optimizer"])

    def __call__(self, feats):
        return F.linear(self.norm(feats), self.weight, self.bias)  # (N, C)

    def step(self, feats, labels):
        """One step on feats (one (B, F) per global crop) and labels (B,); returns its loss."""
        self.norm.train()
        x = torch.cat(feats).detach().float()  # (G B, F)
        y = labels.repeat(len(feats))  # (G B,)
        labelled = (y >= 0).sum()  # the loss: a mean over the global batch's labelled rows
        if dist.is_initialized():
            dist.all_reduce(labelled)
        loss = F.cross_entropy(self(x), y, ignore_index=-1, reduction="sum") / labelled.clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized():  # each rank's share of that mean, summed
            for p in (self.weight, self.bias):
                dist.all_reduce(p.grad)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def accuracy(self, feats, labels):
        """Top-1 (%) on feats (N, F) with labels (N,)."""
        self.norm.eval()
        return evaluate.topk_accuracy(self(feats), labels, ks=(1,))[0]

    def state_dict(self):
        return {"norm": self.norm.state_dict(), "weight": self.weight.detach(),
                "bias": self.bias.detach(), "optimizer": self.optimizer.state_dict()}
