# Copyright (c) mmcbn contributors. All rights reserved.
"""The demo: its data generator, a shortened end-to-end run, and a resume.

``test_quick_demo`` runs ``tools/demo.py --quick`` (detection and
segmentation, a few iterations each on a tiny dataset) in a subprocess;
``test_resume_continues_iterations`` resumes its segmentation checkpoint
in-process through ``tools/train.py --resume`` and checks that training,
the checkpoint and every CBN layer continue from the saved iteration.
"""
import filecmp
import importlib.util
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from script_utils import load_tool

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

make_demo_data = load_tool('make_demo_data')


def _files(root):
    return sorted(
        osp.relpath(osp.join(d, f), root) for d, _, fs in os.walk(root)
        for f in fs)


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic(tmp_path):
    kwargs = dict(num_train=5, num_val=3, size=96, verbose=False)
    make_demo_data.generate(str(tmp_path / 'a'), seed=7, **kwargs)
    make_demo_data.generate(str(tmp_path / 'b'), seed=7, **kwargs)
    make_demo_data.generate(str(tmp_path / 'c'), seed=8, **kwargs)
    files = _files(tmp_path / 'a')
    assert len(files) == 2 + 8 * 3 + 1  # 2 json, 3 images each, meta.json
    assert files == _files(tmp_path / 'b') == _files(tmp_path / 'c')
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / 'a', tmp_path / 'b', files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    _, mismatch, _ = filecmp.cmpfiles(
        tmp_path / 'a', tmp_path / 'c', files, shallow=False)
    assert 'coco/annotations/instances_train.json' in mismatch
    # the validation split does not depend on the size of the training split
    make_demo_data.generate(
        str(tmp_path / 'd'),
        seed=7,
        num_train=2,
        num_val=3,
        size=96,
        verbose=False)
    assert filecmp.cmp(
        tmp_path / 'a/coco/annotations/instances_val.json',
        tmp_path / 'd/coco/annotations/instances_val.json',
        shallow=False)
    assert make_demo_data.is_generated(str(tmp_path / 'a'), 7, 5, 3, 96)
    assert not make_demo_data.is_generated(str(tmp_path / 'a'), 7, 6, 3, 96)
    assert not make_demo_data.is_generated(str(tmp_path / 'x'), 7, 5, 3, 96)


def test_generator_writes_valid_coco_and_seg_maps(tmp_path, capsys):
    from pycocotools.coco import COCO
    size = 96
    make_demo_data.generate(
        str(tmp_path), seed=1, num_train=30, num_val=8, size=size)
    assert 'instances_train.json' in capsys.readouterr().out
    for split, num in (('train', 30), ('val', 8)):
        coco = COCO(str(tmp_path / f'coco/annotations/instances_{split}.json'))
        assert sorted(coco.getImgIds()) == list(range(1, num + 1))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())
                ] == list(make_demo_data.CLASSES)
        classes_seen = set()
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            img = cv2.imread(
                str(tmp_path / 'coco' / split / info['file_name']))
            assert img.shape == (size, size, 3)
            assert (info['width'], info['height']) == (size, size)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert 2 <= len(anns) <= 6
            label = cv2.imread(
                str(tmp_path / 'seg/ann_dir' / split /
                    info['file_name'].replace('.jpg', '.png')),
                cv2.IMREAD_UNCHANGED)
            assert label.shape == (size, size) and label.dtype == np.uint8
            assert set(np.unique(label)) <= {0, 1, 2, 3, 255}
            assert osp.isfile(tmp_path / 'seg/img_dir' / split /
                              info['file_name'])
            union = np.zeros((size, size), bool)
            for ann in anns:
                assert ann['iscrowd'] == 0
                classes_seen.add(ann['category_id'])
                mask = coco.annToMask(ann).astype(bool)
                assert mask.sum() == ann['area'] > 0
                assert not (mask & union).any()  # visible parts: disjoint
                union |= mask
                x, y, w, h = ann['bbox']
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= size and y + h <= size
                ys, xs = np.nonzero(mask)  # the box is the mask's extent
                assert [xs.min(),
                        ys.min(),
                        xs.max() + 1,
                        ys.max() + 1] == [x, y, x + w, y + h]
                # the label map agrees with the instance mask (or ignores
                # its border pixels)
                values = label[mask]
                assert set(np.unique(values)) <= {ann['category_id'], 255}
                assert (values == ann['category_id']).any()
            assert (label[~union] == 0).all()
        assert classes_seen == {1, 2, 3}, split


# ------------------------------------------------------------- quick demo
def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('demo')
    cmd = [
        sys.executable,
        osp.join(REPO, 'tools', 'demo.py'), '--quick', '--work-dir',
        str(work_dir)
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    with open(work_dir / 'summary.json') as f:
        summary = json.load(f)
    return work_dir, summary, output


def _miou_from_predictions(pred_dir, ann_dir, num_classes, ignore=255):
    """mIoU (%) as mmseg's IoUMetric defines it, recomputed from the saved
    prediction PNGs and the ground-truth label maps."""
    intersect = np.zeros(num_classes)
    union = np.zeros(num_classes)
    names = sorted(f for f in os.listdir(pred_dir) if f.endswith('.png'))
    assert names, pred_dir
    for name in names:
        pred = cv2.imread(osp.join(pred_dir, name), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(osp.join(ann_dir, name), cv2.IMREAD_UNCHANGED)
        assert pred.shape == label.shape, name
        valid = label != ignore
        pred, label = pred[valid], label[valid]
        for c in range(num_classes):
            p, g = pred == c, label == c
            intersect[c] += (p & g).sum()
            union[c] += (p | g).sum()
    with np.errstate(invalid='ignore', divide='ignore'):
        return float(np.nanmean(intersect / union) * 100)


def test_quick_demo(quick_demo):
    """Smoke test of the quick demo (its metrics after a few iterations are
    noise, so they are only checked to exist and be finite) and one check
    that can fail: the reported mIoU is the one of the predictions the test
    step saved, recomputed here from the PNGs and the label maps. (The
    exported models are checked against the metrics in
    ``test_stock_test_tool_evaluates_the_exported_model``.)"""
    work_dir, summary, output = quick_demo
    # mmengine's usual training logs, with ETA, and the CBN hook's lines
    assert 'eta:' in output
    assert 'CBNHook: ' in output and 'bound' in output
    assert summary['quick'] and summary['norm'] == 'cbn'
    assert set(summary['tasks']) == {'det', 'seg'}
    det, seg = summary['tasks']['det'], summary['tasks']['seg']
    assert set(det['metrics']) >= {'coco/bbox_mAP', 'coco/segm_mAP'}
    assert set(seg['metrics']) >= {'mIoU'}
    for entry in (det, seg):
        assert all(_finite(v) for v in entry['metrics'].values()), entry
        assert osp.isfile(entry['checkpoint'])
        assert osp.exists(entry['results'])
        assert entry['train_seconds'] > 0
        # the metrics file that mmengine wrote holds the same numbers
        with open(entry['test_log']) as f:
            record = json.loads(f.read().splitlines()[-1])
        for key, value in entry['metrics'].items():
            assert _finite(record[key]) and record[key] == value
    assert osp.basename(det['checkpoint']) == 'epoch_2.pth'
    assert osp.basename(seg['checkpoint']) == 'iter_6.pth'
    assert -1 <= det['metrics']['coco/bbox_mAP'] <= 1
    ann_dir = osp.join(summary['data_root'], 'seg', 'ann_dir', 'val')
    assert len(os.listdir(seg['results'])) == 4  # the 4 val images
    assert seg['metrics']['mIoU'] == pytest.approx(
        _miou_from_predictions(seg['results'], ann_dir, 4), abs=0.006)
    # the summary printed at the end
    assert 'bbox mAP' in output and 'segm mAP' in output and 'mIoU' in output
    # the tiny dataset, marked complete (a second run would skip it)
    assert make_demo_data.is_generated(
        str(work_dir / 'data'), 0, num_train=8, num_val=4, size=128)
    if osp.isfile(osp.join(REPO, 'tools', 'publish_model.py')):
        for entry in (det, seg):
            assert any(f.endswith('.pth') for f in entry['exported'])


@pytest.fixture
def isolated_runner_globals():
    """Forget the loggers, message hubs, scopes and visualizers that an
    in-process runner creates, so that later tests do not reuse them."""
    from mmengine.utils import ManagerMixin

    def classes(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from classes(sub)

    before = {cls: set(cls._instance_dict) for cls in classes(ManagerMixin)}
    yield
    for cls in classes(ManagerMixin):
        for name in set(cls._instance_dict) - before.get(cls, set()):
            instance = cls._instance_dict.pop(name)
            for handler in getattr(instance, 'handlers', []):
                handler.close()  # the log files of MMLogger instances


def test_resume_continues_iterations(quick_demo, tmp_path, monkeypatch,
                                     isolated_runner_globals):
    """Resume the demo's segmentation run (6 iterations) to 10."""
    from mmengine.runner import Runner

    import mmcbn
    from mmcbn import CBNHook, cbn_layers

    work_dir, summary, _ = quick_demo
    seg = summary['tasks']['seg']
    saved = mmcbn.load_checkpoint_file(seg['checkpoint'])
    assert saved['meta']['iter'] == 6

    runners, seen = [], []
    from_cfg = Runner.from_cfg.__func__

    def record_runner(cls, cfg):
        runners.append(from_cfg(cls, cfg))
        return runners[-1]

    after_train_iter = CBNHook.after_train_iter

    def record_iterations(self,
                          runner,
                          batch_idx,
                          data_batch=None,
                          outputs=None):
        model = self._model(runner)
        seen.append((runner.iter, {m.iteration for _, m in cbn_layers(model)}))
        return after_train_iter(self, runner, batch_idx, data_batch, outputs)

    monkeypatch.setattr(Runner, 'from_cfg', classmethod(record_runner))
    monkeypatch.setattr(CBNHook, 'after_train_iter', record_iterations)
    train = load_tool('train')
    resumed_dir = tmp_path / 'resumed'
    data_root = osp.join(work_dir, 'data', 'seg') + '/'
    train.main([
        osp.join(REPO, 'configs/demo/fcn_r18-d8_cbn_demo.py'), '--work-dir',
        str(resumed_dir), '--resume', seg['checkpoint'], '--cfg-options',
        f'train_dataloader.dataset.data_root={data_root}',
        'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
        'train_cfg.max_iters=10', 'default_hooks.checkpoint.interval=2',
        'default_hooks.logger.interval=1', 'train_dataloader.num_workers=0',
        'model.backbone.norm_cfg.burnin=2',
        'model.decode_head.norm_cfg.burnin=2',
        'model.auxiliary_head.norm_cfg.burnin=2'
    ])
    runner = runners[-1]
    assert runner.iter == 10
    # iterations 6..9 ran (not 0..9), and every CBN layer was told each one
    assert seen == [(it, {it}) for it in range(6, 10)]
    layers = list(cbn_layers(runner.model))
    assert len(layers) > 10
    assert all(layer.iteration == runner.iter - 1 for _, layer in layers)
    assert all(layer.window_at(runner.iter - 1) == 4 for _, layer in layers)
    # checkpoints continue the count: iter_8, iter_10; not iter_2 or iter_4
    names = sorted(os.listdir(resumed_dir))
    assert 'iter_10.pth' in names and 'iter_2.pth' not in names
    final = mmcbn.load_checkpoint_file(str(resumed_dir / 'iter_10.pth'))
    assert final['meta']['iter'] == 10
    logs = [
        osp.join(d, f) for d, _, fs in os.walk(resumed_dir) for f in fs
        if f.endswith('.log')
    ]
    assert len(logs) == 1
    with open(logs[0]) as f:
        log = f.read()
    assert 'resumed epoch: 0, iter: 6' in log
    assert 'Iter(train) [ 7/10]' in log and 'Iter(train) [ 1/10]' not in log


# ---------------------------------------------------------------- configs
def _without_norm(obj, also=()):
    """A config dict without its norm settings (norm_cfg, custom_hooks, and
    the keys ``also``)."""
    drop = ('norm_cfg', 'custom_hooks', 'filename', 'text') + tuple(also)
    if isinstance(obj, dict):
        return {
            k: _without_norm(v, also)
            for k, v in obj.items() if k not in drop
        }
    if isinstance(obj, (list, tuple)):
        return [_without_norm(v, also) for v in obj]
    return obj


@pytest.mark.parametrize('name', ['mask-rcnn_r18_fpn', 'fcn_r18-d8'])
def test_demo_config_variants_differ_only_in_norm(name,
                                                  isolated_runner_globals):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import mmcbn  # noqa: F401

    cfgs = {
        norm:
        Config.fromfile(
            osp.join(REPO, 'configs', 'demo', f'{name}_{norm}_demo.py'))
        for norm in ('cbn', 'bn', 'gn', 'mabn')
    }
    # (before any build, which edits the model dicts; MABN's recipe also
    # centres the convolutions' weights)
    base = {also: _without_norm(cfgs['cbn'].to_dict(), also)
            for also in ((), ('conv_cfg', ))}
    types = {}
    for norm, cfg in cfgs.items():
        also = ('conv_cfg', ) if norm == 'mabn' else ()
        assert _without_norm(cfg.to_dict(), also) == base[also], norm
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.model.backbone.get('init_cfg') is None
        assert cfg.model.get('pretrained') is None
        norms = []

        def collect(obj):
            if isinstance(obj, dict):
                if isinstance(obj.get('norm_cfg'), dict):
                    norms.append(obj['norm_cfg']['type'])
                for v in obj.values():
                    collect(v)

        collect(cfg.to_dict()['model'])
        types[norm] = set(norms)
        assert any(h['type'] == 'CBNHook'
                   for h in cfg.custom_hooks) == (norm == 'cbn')
        # the model builds, without downloading anything
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        kinds = {type(m).__name__ for m in model.modules()}
        expected = {'cbn': 'CBN2d', 'bn': 'BatchNorm2d', 'gn': 'GroupNorm',
                    'mabn': 'MABN2d'}
        assert expected[norm] in kinds
        if norm != 'cbn':
            assert 'CBN2d' not in kinds
        assert ('ConvWC' in kinds) == (norm == 'mabn')
    assert types == {'cbn': {'CBN'}, 'bn': {'BN'}, 'gn': {'GN'},
                     'mabn': {'MABN'}}


def test_a_second_demo_run_replaces_its_own_export(quick_demo, capsys):
    """make demo runs again in a checkout where it ran before: the export
    step replaces the earlier run's export as a whole (the training and
    test steps write over their own outputs already) and says so."""
    _, summary, _ = quick_demo
    entry = summary['tasks']['seg']
    export = entry['export_dir']
    config = osp.join(REPO, entry['config'])
    old = {f: osp.getmtime(osp.join(export, f)) for f in entry['exported']}
    # an earlier run's checkpoint, named by the hash of other weights
    stale = osp.join(export, 'fcn_r18-d8_cbn_demo-00000000.pth')
    open(stale, 'wb').close()
    demo = load_tool('demo')
    files = demo.export_task('segmentation (FCN)', entry['checkpoint'],
                             config, export, dict(os.environ))
    assert files == entry['exported'] and len(files) == 2
    assert sorted(os.listdir(export)) == files  # the stale file is gone
    assert all(osp.getmtime(osp.join(export, f)) > old[f] for f in files)
    assert 'held the export of an earlier demo run; replaced' in \
        capsys.readouterr().out
    assert sorted(os.listdir(osp.dirname(export))) == ['det', 'seg']
    # a first export: nothing to replace
    fresh = osp.join(osp.dirname(export), 'fresh')
    assert demo.export_task('segmentation (FCN)', entry['checkpoint'],
                            config, fresh, dict(os.environ)) == files
    assert 'replaced' not in capsys.readouterr().out
    shutil.rmtree(fresh)


@pytest.mark.parametrize('task,codebase', [('det', 'mmdet'), ('seg', 'mmseg')])
def test_stock_test_tool_evaluates_the_exported_model(quick_demo, task,
                                                      codebase, tmp_path):
    """The codebase's OWN tools/test.py, in a process where mmcbn cannot be
    imported, evaluates the published model to the CBN model's metrics."""
    _, summary, _ = quick_demo
    entry = summary['tasks'][task]
    export = entry['export_dir']
    config = [f for f in os.listdir(export) if f.endswith('.py')]
    ckpt = [f for f in os.listdir(export) if f.endswith('.pth')]
    assert len(config) == 1 and len(ckpt) == 1, os.listdir(export)
    demo = load_tool('demo')
    options = demo._data_options(task, summary['data_root'], 'test') + \
        demo._quick_test_options(task, True)
    stock_test = osp.join(
        osp.dirname(importlib.util.find_spec(codebase).origin), '.mim',
        'tools', 'test.py')
    env = dict(os.environ, PYTHONPATH='', OMP_WAIT_POLICY='PASSIVE')
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tests', 'run_without_mmcbn.py'),
         stock_test, osp.join(export, config[0]), osp.join(export, ckpt[0]),
         '--work-dir', str(tmp_path), '--cfg-options', *options],
        cwd=str(tmp_path), env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    logs = [osp.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
            if f.endswith('.json') and 'vis_data' not in d]
    assert logs, os.listdir(tmp_path)
    with open(sorted(logs)[-1]) as f:
        record = json.loads(f.read().splitlines()[-1])
    for key, value in entry['metrics'].items():
        assert record[key] == pytest.approx(value, abs=1e-4), key
