"""fastmf.models.Item2Vec: pair generation against a direct Python reference, one fused step
against plain autograd with torch.optim, planted clusters, determinism, bad input."""

import numpy as np
import pytest
import torch
from _ids import ID_FORMS

from fastmf.data import Interactions
from fastmf.models.item2vec import (
    Item2Vec,
    drop_rare,
    keep_probability,
    sequences_of,
    sequences_to_interactions,
    skipgram_pairs,
    unigram_distribution,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tables here are tiny: on a busy machine each parallel region of a step waits for
    a descheduled thread (measured 400 ms against 10 ms per step on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zipf_sequences(rng, count, num_items, longest=30):
    """Sequences of Zipf-distributed ids (frequent items repeat, within a sequence too)."""
    return [(rng.zipf(1.3, size=int(rng.integers(1, longest))) - 1) % num_items
            for _ in range(count)]


def reference_pairs(sequences, window, keep, seed):
    """Pairs the slow way: drop positions, then every pair at distance 1..window; grouped by
    distance, (earlier, later) pairs of all sequences before (later, earlier) ones."""
    total = sum(len(s) for s in sequences)
    draws = np.random.default_rng(seed).random(total) if keep is not None else None
    kept, position = [], 0
    for seq in sequences:
        out = []
        for item in seq:
            if draws is None or draws[position] < keep[item]:
                out.append(int(item))
            position += 1
        kept.append(out)
    pairs = []
    for d in range(1, window + 1):
        forward, backward = [], []
        for seq in kept:
            for j in range(len(seq) - d):
                forward.append((seq[j], seq[j + d]))
                backward.append((seq[j + d], seq[j]))
        pairs += forward + backward
    return pairs


def train(model, data, *, epochs, seed=0, lr=0.05, batch_size=256, num_negatives=5,
          optimizer="adagrad"):
    model.prepare(data)
    opt = model.make_optimizer(optimizer, lr)
    losses = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        total = count = 0
        for batch in model.batches(data, batch_size=batch_size, num_negatives=num_negatives,
                                   generator=gen):
            loss, n = model.training_step(batch, opt, loss="bce")
            total, count = total + float(loss) * n, count + n
        losses.append(total / count)
    return losses


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("threshold", [None, 5e-3, 3e-2])
def test_pairs_equal_python_reference(window, threshold):
    rng = np.random.default_rng(window * 7 + (0 if threshold is None else int(1 / threshold)))
    num_items = 40
    sequences = zipf_sequences(rng, 25, num_items)
    tokens, offsets = sequences_of(sequences, num_items)
    counts = np.bincount(tokens, minlength=num_items)
    keep = keep_probability(counts, threshold)
    if threshold is not None:
        # The documented formula: keep with probability min(1, sqrt(t / f)).
        freq = counts / counts.sum()
        seen = counts > 0
        np.testing.assert_allclose(keep[seen], np.minimum(1, np.sqrt(threshold / freq[seen])))
        assert (keep[seen] < 1).any()
    centers, contexts = skipgram_pairs(tokens, offsets, window, keep,
                                       np.random.default_rng(123))
    expected = reference_pairs(sequences, window, keep, 123)
    assert list(zip(centers.tolist(), contexts.tolist(), strict=True)) == expected
    assert len(expected) > 0


def test_subsampling_drops_frequent_items_at_the_documented_rate():
    rng = np.random.default_rng(5)
    tokens, offsets = sequences_of(zipf_sequences(rng, 400, 30, longest=60), 30)
    counts = np.bincount(tokens, minlength=30)
    keep = keep_probability(counts, 1e-2)
    top = int(np.argmax(counts))
    kept = 0
    for trial in range(20):
        draws = np.random.default_rng(trial).random(len(tokens))
        kept += int(((draws < keep[tokens]) & (tokens == top)).sum())
    rate = kept / (20 * counts[top])
    assert keep[top] < 0.5
    assert abs(rate - keep[top]) < 4 * np.sqrt(keep[top] / (20 * counts[top]))


def test_negatives_follow_unigram_power():
    rng = np.random.default_rng(2)
    num_items = 30
    sequences = zipf_sequences(rng, 60, num_items)
    model = Item2Vec(num_items, dim=4, window=3, subsample=None, min_count=1)
    negatives = np.concatenate([
        b.negatives.numpy().ravel()
        for b in model.batches(sequences, batch_size=500, num_negatives=20,
                               generator=torch.Generator().manual_seed(0))])
    tokens, _ = sequences_of(sequences, num_items)
    expected = unigram_distribution(np.bincount(tokens, minlength=num_items), 0.75)
    observed = np.bincount(negatives, minlength=num_items) / len(negatives)
    assert len(negatives) > 20000
    assert np.abs(observed - expected).max() < 4 * np.sqrt(expected.max() / len(negatives))
    assert observed[expected == 0].sum() == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("reg", [0.0, 0.01])
def test_fused_step_equals_plain_autograd(optimizer, reg):
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    num_items, dim = 60, 8
    sequences = zipf_sequences(rng, 30, num_items)
    model = Item2Vec(num_items, dim=dim, window=2, subsample=1e-2)
    with torch.no_grad():  # both tables random, so the first step moves both
        model.item_embeddings.weight.normal_(0, 0.3)
        model.context_embeddings.weight.normal_(0, 0.3)
    plain_in = torch.nn.Embedding(num_items, dim, sparse=True)
    plain_out = torch.nn.Embedding(num_items, dim, sparse=True)
    with torch.no_grad():
        plain_in.weight.copy_(model.item_embeddings.weight)
        plain_out.weight.copy_(model.context_embeddings.weight)
    params = [plain_in.weight, plain_out.weight]
    lr = 0.1
    plain_opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
                 else torch.optim.Adagrad(params, lr=lr))
    model.prepare(sequences)
    fused_opt = model.make_optimizer(optimizer, lr)
    batches = list(model.batches(sequences, batch_size=64, num_negatives=4,
                                 generator=torch.Generator().manual_seed(1)))[:3]
    assert any(len(torch.unique(b.negatives)) < b.negatives.numel() for b in batches)
    for batch in batches:
        fused_loss, count = model.training_step(batch, fused_opt, loss="bce", reg=reg)
        c, o, n = plain_in(batch.users), plain_out(batch.items), plain_out(batch.negatives)
        size = len(batch.users)
        loss = (-torch.nn.functional.logsigmoid((c * o).sum(-1)).sum()
                - torch.nn.functional.logsigmoid(-(c.unsqueeze(1) * n).sum(-1)).sum()) / size
        objective = loss + reg * (c.pow(2).sum() + o.pow(2).sum() + n.pow(2).sum()) / size
        plain_opt.zero_grad()
        objective.backward()
        plain_opt.step()
        assert count == size
        torch.testing.assert_close(fused_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.item_embeddings.weight.detach(), plain_in.weight.detach(),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.context_embeddings.weight.detach(),
                                   plain_out.weight.detach(), rtol=1e-5, atol=1e-6)
    assert model.item_embeddings.weight.grad is None


def planted_clusters(rng, clusters=4, per_cluster=10, users=150, length=25, noise=0.1):
    """Each user's sequence draws mostly from one cluster of items."""
    sequences, labels = [], np.repeat(np.arange(clusters), per_cluster)
    for _ in range(users):
        own = rng.integers(clusters)
        members = np.flatnonzero(labels == own)
        seq = rng.choice(members, size=length)
        stray = rng.random(length) < noise
        seq[stray] = rng.integers(0, len(labels), size=int(stray.sum()))
        sequences.append(seq)
    return sequences, labels


def test_planted_clusters_become_neighbours_and_recommendations():
    import fastmf

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sequences, labels = planted_clusters(rng)
    model = Item2Vec(len(labels), dim=16, window=3, subsample=None)
    losses = train(model, sequences, epochs=4, lr=0.2, batch_size=2048)
    assert losses[-1] < losses[0]
    top, _ = model.similar_items(torch.arange(len(labels)), k=5)
    same = (labels[top.numpy()] == labels[:, None]).mean()
    # Chance is 9/39 ~ 0.23.
    assert same >= 0.9, same
    # Latent arithmetic on one item is its cosine neighbourhood.
    for item in (0, 17, 33):
        assert model.analogy([item], k=5)[0].tolist() == top[item].tolist()
    # A user's recommendations come from the cluster of their history.
    users = torch.arange(len(sequences))
    own = np.array([np.bincount(labels[s], minlength=4).argmax() for s in sequences])
    recommended, _ = model.recommend(users, k=5)
    assert (labels[recommended.numpy()] == own[:, None]).mean() >= 0.9
    # fit/evaluate's ranking path: held-out items of the user's own cluster rank high.
    data = sequences_to_interactions(sequences, len(labels))
    model.attach_data(data)
    held = [int(rng.choice(np.flatnonzero(labels == own[u]))) for u in range(len(sequences))]
    test = Interactions(np.arange(len(sequences)), held, user_map=data.num_users,
                        item_map=data.num_items)
    hr = fastmf.evaluate(model, test, metrics=("hr@5",))["hr@5"]
    assert hr >= 0.4, hr  # chance 5/40


def test_histories_follow_timestamps_and_user_vectors_are_their_means():
    torch.manual_seed(1)
    data = Interactions([1, 0, 1, 1, 0, 2], [4, 2, 3, 0, 5, 1],
                        timestamps=[30, 5, 10, 20, 1, 7], user_map=4, item_map=6)
    model = Item2Vec(6, dim=4, window=1)
    model.prepare(data)
    assert model.num_users == 4 and model.get_config()["num_history"] == 6
    assert model.history_indptr.tolist() == [0, 2, 5, 6, 6]
    assert model.history_items.tolist() == [5, 2, 3, 0, 4, 1]
    vectors, offset = model.user_vectors(torch.tensor([1, 3, 0]))
    weight = model.item_embeddings.weight.detach()
    assert offset is None
    torch.testing.assert_close(vectors[0], weight[[3, 0, 4]].mean(0))
    torch.testing.assert_close(vectors[1], torch.zeros(4))
    torch.testing.assert_close(vectors[2], weight[[5, 2]].mean(0))
    torch.testing.assert_close(model.predict(torch.tensor([1]), torch.tensor([2])),
                               (weight[[3, 0, 4]].mean(0) * weight[2]).sum().reshape(1))
    no_time = Interactions([1, 0, 1, 1], [4, 2, 3, 0], user_map=2, item_map=6)
    model.prepare(no_time)
    assert model.history_items.tolist() == [2, 4, 3, 0]
    assert Item2Vec(**model.get_config()).state_dict().keys() == model.state_dict().keys()
    rebuilt = Item2Vec(**model.get_config())
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.history_items.tolist() == [2, 4, 3, 0]


def test_deterministic_given_seeds():
    rng = np.random.default_rng(4)
    sequences = zipf_sequences(rng, 30, 50)
    weights = []
    for seed in (7, 7, 8):
        torch.manual_seed(0)
        model = Item2Vec(50, dim=8, window=2, subsample=1e-2)
        train(model, sequences, epochs=2, seed=seed)
        weights.append(torch.cat([model.item_embeddings.weight.detach(),
                                  model.context_embeddings.weight.detach()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_bad_input():
    with pytest.raises(ValueError, match="Item2Vec: window must be an int >= 1, got 0"):
        Item2Vec(10, window=0)
    with pytest.raises(ValueError, match="Item2Vec: dim must be an int >= 1, got 0"):
        Item2Vec(10, dim=0)
    with pytest.raises(ValueError, match="Item2Vec: num_items"):
        Item2Vec(0)
    with pytest.raises(ValueError, match="Item2Vec: subsample"):
        Item2Vec(10, subsample=-1e-5)
    model = Item2Vec(10, dim=4)
    with pytest.raises(ValueError, match=r"Item2Vec.prepare: sequences is empty"):
        model.prepare([])
    with pytest.raises(ValueError, match=r"Item2Vec.prepare: sequences\[1\] is empty"):
        model.prepare([np.array([1, 2]), np.array([], dtype=np.int64)])
    with pytest.raises(IndexError, match=r"sequences\[0\] holds item 10, out of range \[0, 10\)"):
        model.prepare([np.array([1, 10])])
    with pytest.raises(IndexError, match=r"holds item -1"):
        model.prepare([np.array([-1, 3])])
    with pytest.raises(TypeError, match=r"sequences\[0\] must be a 1-D array of integer"):
        model.prepare([np.array([1.5, 2.0])])
    with pytest.raises(ValueError, match="the data has 12 items, the model 10"):
        model.prepare(Interactions([0, 1], [3, 11]))
    with pytest.raises(ValueError, match="the data has 12 items, the model 10"):
        model.check_data(Interactions([0, 1], [3, 11]))
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1, got 0"):
        next(model.batches([np.array([1, 2])], batch_size=4, num_negatives=0))
    model.prepare([np.array([1, 2, 3])])
    with pytest.raises(IndexError, match=r"Item2Vec.user_vectors: users id 1 out of range "
                                         r"\[0, 1\)"):
        model.user_vectors([1])


def test_sequences_and_their_interactions_train_alike():
    rng = np.random.default_rng(6)
    sequences = zipf_sequences(rng, 20, 30)
    data = sequences_to_interactions(sequences, 30)
    shuffled = data.subset(rng.permutation(len(data)))  # timestamps restore the order
    for source in (data, shuffled):
        tokens, offsets = sequences_of(source, 30)
        expected, expected_offsets = sequences_of(sequences, 30)
        np.testing.assert_array_equal(tokens, expected)
        np.testing.assert_array_equal(offsets, expected_offsets)
    model = Item2Vec(30, dim=4, window=2, subsample=None)
    a = list(model.batches(sequences, batch_size=50, generator=torch.Generator().manual_seed(2)))
    b = list(model.batches(shuffled, batch_size=50, generator=torch.Generator().manual_seed(2)))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.users, y.users) and torch.equal(x.items, y.items)
        assert torch.equal(x.negatives, y.negatives)


def test_min_count_drops_rare_items_before_the_window():
    rng = np.random.default_rng(8)
    sequences = zipf_sequences(rng, 30, 40) + [np.array([39, 38])]
    tokens, offsets = sequences_of(sequences, 40)
    counts = np.bincount(tokens, minlength=40)
    kept_tokens, kept_offsets, kept_counts = drop_rare(tokens, offsets, 40, 3)
    expected = [[int(i) for i in seq if counts[i] >= 3] for seq in sequences]
    assert [kept_tokens[a:b].tolist() for a, b in zip(kept_offsets[:-1], kept_offsets[1:],
                                                      strict=True)] == expected
    np.testing.assert_array_equal(kept_counts, np.where(counts >= 3, counts, 0))
    assert (counts[(counts > 0) & (counts < 3)]).size > 0
    model = Item2Vec(40, dim=4, window=2, subsample=None, min_count=3)
    batches = list(model.batches(sequences, batch_size=10_000, num_negatives=3,
                                 generator=torch.Generator().manual_seed(0)))
    centers, contexts = skipgram_pairs(kept_tokens, kept_offsets, 2)
    rare = np.flatnonzero(counts < 3)
    for values in (batches[0].users, batches[0].items, batches[0].negatives):
        assert not np.isin(values.numpy(), rare).any()
    assert sorted(zip(batches[0].users.tolist(), batches[0].items.tolist(), strict=True)) == (
        sorted(zip(centers.tolist(), contexts.tolist(), strict=True)))


def test_fit_save_load_round_trip(tmp_path):
    import fastmf

    torch.manual_seed(0)
    rng = np.random.default_rng(9)
    sequences, labels = planted_clusters(rng, users=60, length=12)
    data = sequences_to_interactions(sequences, len(labels))
    model = Item2Vec.from_interactions(data, dim=8, window=2, subsample=None)
    history = fastmf.fit(model, data, epochs=2, batch_size=512, progress=False, seed=3)
    assert len(history) == 2 and history["loss"][1] < history["loss"][0]
    assert model.num_users == 60 and model.user_map is not None
    items, scores = model.recommend([0, 1], k=3, exclude=data)
    model.save(tmp_path / "i2v")
    loaded = fastmf.load(tmp_path / "i2v")
    assert isinstance(loaded, Item2Vec) and loaded.get_config() == model.get_config()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    items2, scores2 = loaded.recommend([0, 1], k=3, exclude=data)
    assert torch.equal(items, items2) and torch.equal(scores, scores2)
    # The same seeds give the same weights through fit.
    torch.manual_seed(0)
    again = Item2Vec.from_interactions(data, dim=8, window=2, subsample=None)
    fastmf.fit(again, data, epochs=2, batch_size=512, progress=False, seed=3)
    assert torch.equal(again.item_embeddings.weight, model.item_embeddings.weight)


def test_scores_of_good_ids_are_history_means_dotted_with_the_item():
    rng = np.random.default_rng(12)
    sequences = zipf_sequences(rng, 35, 40)
    torch.manual_seed(2)
    model = Item2Vec(40, dim=6, window=2, subsample=None, min_count=1)
    train(model, sequences, epochs=1)
    assert model.num_users == 35
    weight = model.item_embeddings.weight.detach()
    table = weight.double().numpy()
    means = np.stack([table[np.asarray(s)].mean(0) for s in sequences])
    users = (rng.zipf(1.3, 300) - 1) % 35
    items = (rng.zipf(1.3, 300) - 1) % 40
    users[:2], items[:2] = [0, 34], [39, 0]
    assert np.bincount(users).max() > 30  # duplicates, skewed
    brute = np.einsum("bd,bd->b", means[users], table[items])
    assert np.all(np.abs(brute) > 1e-9)
    # What forward computed before its ids were checked (the history pool, then the dot).
    pooled = torch.stack([weight[torch.as_tensor(s)].float().mean(0) for s in sequences])
    reference = model.predict(torch.as_tensor(users), torch.as_tensor(items))
    for form in ID_FORMS:
        got = model.predict(form(users), form(items))
        assert torch.equal(got, reference)
        np.testing.assert_allclose(got.double().numpy(), brute, rtol=1e-5, atol=1e-7)
        vectors, offset = model.user_vectors(form(users))
        assert offset is None
        torch.testing.assert_close(vectors, pooled[torch.as_tensor(users)])
    grid = model.score_items(users[:5].tolist(), torch.as_tensor(items[:7], dtype=torch.int32))
    np.testing.assert_allclose(grid.double().numpy(), means[users[:5]] @ table[items[:7]].T,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("users, items, error, match", [
    ([-1], [0], IndexError, r"users id -1 out of range \[0, 3\)"),
    ([3], [0], IndexError, r"users id 3 out of range \[0, 3\)"),
    ([0], [-1], IndexError, r"items id -1 out of range \[0, 10\)"),
    ([0], [10], IndexError, r"items id 10 out of range \[0, 10\)"),
    (torch.tensor([0]), torch.tensor([1.9]), TypeError,
     "items must be int32 or int64, got torch.float32"),
    (torch.tensor([0.9]), torch.tensor([1]), TypeError,
     "users must be int32 or int64, got torch.float32"),
    ([0], [1.5], TypeError, "items must be integer ids, got dtype float64"),
    ([0], [0, 1, 2], ValueError, r"lengths differ \(users has 1, items has 3\)"),
])
def test_bad_scoring_ids_raise_as_mf_does(users, items, error, match):
    # item -1 used to be item 9, 1.9 item 1, and one user broadcast over three items.
    torch.manual_seed(0)
    model = Item2Vec(10, dim=4, min_count=1)
    model.prepare([np.array([1, 2, 3]), np.array([4, 4]), np.array([9, 0])])
    for call in (model.predict, model.forward):
        with pytest.raises(error, match=r"^fastmf\.models\.Item2Vec\.forward: " + match):
            call(users, items)
    if match.startswith("users"):
        with pytest.raises(error, match=r"^fastmf\.models\.Item2Vec\.user_vectors: " + match):
            model.user_vectors(users)
