"""The fine-tuning loop: seeded, lowers the training loss, keeps the best epoch."""

import torch
import transformers as tf

from nvformer_studies.common.checkpoints import load_minilm
from nvformer_studies.common.data import read_reviews
from nvformer_studies.common.finetune import FinetuneConfig, finetune_classifier
from nvformer_studies.common.subsets import stratified_split


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2)
    return tf.BertForSequenceClassification(cfg)


def test_finetune_lowers_loss_is_seeded_and_restores_the_best_epoch():
    _, tok = load_minilm()
    r = read_reviews("books")
    tr, va = stratified_split(r.labels, (0.5, 0.5), seed=0)
    tr, va = tr[:48], va[:32]
    args = ([r.texts[i] for i in tr], [r.labels[i] for i in tr], [r.texts[i] for i in va], [r.labels[i] for i in va])
    cfg = FinetuneConfig(epochs=4, lr=3e-3, batch_size=8, max_length=48, seed=3)
    m1 = _tiny()
    h1 = finetune_classifier(m1, tok, *args, config=cfg, show_progress=False)
    assert h1.train_loss[-1] < h1.train_loss[0]
    assert h1.best_epoch == max(range(4), key=lambda e: (h1.val_accuracy[e], -e))
    m2 = _tiny()
    h2 = finetune_classifier(m2, tok, *args, config=cfg, show_progress=False)
    assert h1.train_loss == h2.train_loss and h1.val_accuracy == h2.val_accuracy
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_the_classification_head_is_seeded():
    a, _ = load_minilm(head="classification", seed=3)
    torch.manual_seed(123)
    b, _ = load_minilm(head="classification", seed=3)
    c, _ = load_minilm(head="classification", seed=4)
    assert torch.equal(a.classifier.weight, b.classifier.weight) and not torch.equal(a.classifier.weight, c.classifier.weight)
