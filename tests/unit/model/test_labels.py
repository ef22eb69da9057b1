from __future__ import annotations

import pytest

from timmserve.errors import ModelLoadError
from timmserve.model.labels import load_labels


def test_imagenet_names_come_from_timm_offline():
    labels = load_labels(1000)
    assert len(labels) == 1000
    assert labels[281] == "tabby, tabby cat" and labels[967] == "espresso"


def test_label_file_for_a_fine_tuned_model(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n  bird  \n\n")
    assert load_labels(3, label_file=path) == ["cat", "dog", "bird"]


def test_label_count_must_match_the_model(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n")
    with pytest.raises(ModelLoadError, match="has 2 labels but the model has 3 classes"):
        load_labels(3, label_file=path)
    with pytest.raises(ModelLoadError, match="has 1000 labels but the model has 999"):
        load_labels(999, model_label_names=load_labels(1000))


def test_an_empty_line_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\n\ndog\n")
    with pytest.raises(ModelLoadError, match="empty label on line 2"):
        load_labels(3, label_file=path)


def test_model_label_names_win_and_synsets_become_words():
    assert load_labels(2, model_label_names=["ok", "not ok"]) == ["ok", "not ok"]
    assert load_labels(2, model_label_names=["n01440764", "n02123045"]) == ["tench, Tinca tinca", "tabby, tabby cat"]


def test_unknown_class_count_without_labels_asks_for_a_file():
    with pytest.raises(ModelLoadError, match="--labels FILE"):
        load_labels(7)
