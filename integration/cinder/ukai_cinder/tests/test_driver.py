"""Unit tests of the ukai driver's logic on Cinder's own test base. The
ukai API is replaced by a recording stand-in here; the end-to-end test
(integration/cinder/e2e) runs the driver against a real ukai cluster."""

import http.server
import json
import os
import socket
import tempfile
import threading
from unittest import mock

from cinder import exception
from cinder.tests.unit import fake_constants as fake
from cinder.tests.unit import fake_snapshot
from cinder.tests.unit import fake_volume
from cinder.tests.unit import test
from cinder.volume import configuration as conf
from oslo_utils import units

from ukai_cinder import client as ukai_client
from ukai_cinder import driver as ukai_driver

NODES = [
    {'name': 'n1', 'state': 'alive', 'iscsi_addr': '127.0.0.1:3261', 'labels': {'host': 'hv1'},
     'capacity_bytes': 100 * units.Gi, 'free_bytes': 60 * units.Gi},
    {'name': 'n2', 'state': 'alive', 'iscsi_addr': '127.0.0.1:3262', 'labels': {'host': 'hv2'},
     'capacity_bytes': 100 * units.Gi, 'free_bytes': 40 * units.Gi},
    {'name': 'n3', 'state': 'dead', 'iscsi_addr': '127.0.0.1:3263', 'labels': {'host': 'hv3'},
     'capacity_bytes': 100 * units.Gi, 'free_bytes': 100 * units.Gi},
]


def make_config(**over):
    cfg = mock.Mock(spec=conf.Configuration)
    values = {o.dest: o.default for o in ukai_driver.ukai_opts}
    values.update(volume_backend_name='ukai', reserved_percentage=0,
                  max_over_subscription_ratio=20.0, volume_dd_blocksize='1M')
    values.update(over)
    for k, v in values.items():
        setattr(cfg, k, v)
    cfg.safe_get.side_effect = lambda k: values.get(k)
    return cfg


class UkaiDriverTestCase(test.TestCase):

    def setUp(self):
        super(UkaiDriverTestCase, self).setUp()
        self.ctx = mock.Mock()
        self.driver = ukai_driver.UkaiISCSIDriver(configuration=make_config())
        self.client = mock.Mock(spec=ukai_client.Client)
        self.client.addresses = ['http://127.0.0.1:7700']
        self.client.nodes.return_value = NODES
        self.driver.client = self.client
        self.specs = {}
        self.mock_object(ukai_driver.volume_types, 'get_volume_type_extra_specs',
                         side_effect=lambda type_id: self.specs)
        self.qos = {'qos_specs': None}
        self.mock_object(ukai_driver.volume_types, 'get_volume_type_qos_specs',
                         side_effect=lambda type_id: self.qos)
        self.volume = fake_volume.fake_volume_obj(self.ctx, size=2, volume_type_id=fake.VOLUME_TYPE_ID,
                                                  provider_auth='CHAP ukai-u1 s3cretsecret0001')

    def test_create_volume_follows_the_volume_type(self):
        self.specs = {'ukai:replicas': '3', 'ukai:locations': 'n1, n2', 'ukai:min_copies': '2',
                      'ukai:sync_window': '22:00-06:00', 'ukai:max_rate': '50MiB/s', 'other:thing': 'x'}
        self.driver.create_volume(self.volume)
        self.client.create_image.assert_called_once_with(
            self.volume.name, 2 * units.Gi, locations=['n1', 'n2'], min_copies=2,
            block_size=None, source=None, timeout=mock.ANY)
        self.assertEqual([mock.call(self.volume.name, replicas=3), mock.call(self.volume.name, locality='best-effort')],
                         self.client.set_policy.call_args_list)
        self.client.set_sync_policy.assert_called_once_with(
            self.volume.name, windows=['22:00-06:00'], max_rate='50MiB/s', tz=None)

    def test_create_volume_defaults(self):
        self.driver.create_volume(self.volume)
        self.client.create_image.assert_called_once_with(
            self.volume.name, 2 * units.Gi, locations=None, min_copies=1,
            block_size=None, source=None, timeout=mock.ANY)
        self.assertEqual([mock.call(self.volume.name, replicas=2), mock.call(self.volume.name, locality='best-effort')],
                         self.client.set_policy.call_args_list)
        self.client.set_sync_policy.assert_not_called()
        self.client.set_policy.reset_mock()
        self.specs = {'ukai:follow_vm': 'false'}
        self.driver.create_volume(self.volume)
        self.client.set_policy.assert_called_with(self.volume.name, locality='off')
        # A node older than the locality policy refuses it: the volume is kept.
        self.client.set_policy.side_effect = [None, ukai_client.UkaiError(400, 'unknown field "locality"')]
        self.client.delete_image.reset_mock()
        self.driver.create_volume(self.volume)
        self.client.delete_image.assert_not_called()

    def test_bad_extra_specs_create_nothing(self):
        for specs in ({'ukai:replicas': 'two'}, {'ukai:replicas': '0'}, {'ukai:nonsense': '1'},
                      {'ukai:replicas': '1', 'ukai:min_copies': '2'}, {'ukai:follow_vm': 'maybe'}):
            self.specs = specs
            self.assertRaises(exception.InvalidVolumeType, self.driver.create_volume, self.volume)
        self.client.create_image.assert_not_called()

    def test_policy_failure_deletes_the_new_image(self):
        self.client.set_policy.side_effect = ukai_client.UkaiError(400, 'replicas 5: only 2 nodes')
        e = self.assertRaises(exception.InvalidInput, self.driver.create_volume, self.volume)
        self.assertIn('replicas 5: only 2 nodes', str(e))
        self.client.delete_image.assert_called_once_with(self.volume.name, now=True)

    def test_create_from_snapshot_and_clone_name_the_source(self):
        snap = fake_snapshot.fake_snapshot_obj(self.ctx, volume_id=fake.VOLUME2_ID)
        snap.volume = fake_volume.fake_volume_obj(self.ctx, id=fake.VOLUME2_ID)
        self.driver.create_volume_from_snapshot(self.volume, snap)
        # Snapshots are named per image: VOLUME@SNAPSHOT.
        self.assertEqual(snap.volume_name + '@' + snap.name, self.client.create_image.call_args[1]['source'])
        src = fake_volume.fake_volume_obj(self.ctx, id=fake.VOLUME2_ID)
        self.driver.create_cloned_volume(self.volume, src)
        self.assertEqual(src.name, self.client.create_image.call_args[1]['source'])

    def test_missing_source_is_reported_with_its_name(self):
        self.client.create_image.side_effect = ukai_client.UkaiError(404, 'source: "x": image not found')
        e = self.assertRaises(exception.VolumeBackendAPIException, self.driver.create_cloned_volume,
                              self.volume, fake_volume.fake_volume_obj(self.ctx, id=fake.VOLUME2_ID))
        self.assertIn('not found', str(e))

    def test_min_copies_needs_enough_locations(self):
        self.specs = {'ukai:min_copies': '2', 'ukai:replicas': '3'}
        e = self.assertRaises(exception.InvalidVolumeType, self.driver.create_volume, self.volume)
        self.assertIn('ukai:locations', str(e))
        self.client.create_image.assert_not_called()

    def test_a_copy_without_locations_keeps_the_sources_min_copies(self):
        snap = fake_snapshot.fake_snapshot_obj(self.ctx, volume_id=fake.VOLUME2_ID)
        snap.volume = fake_volume.fake_volume_obj(self.ctx, id=fake.VOLUME2_ID)
        self.driver.create_volume_from_snapshot(self.volume, snap)
        self.assertIsNone(self.client.create_image.call_args[1]['min_copies'])
        self.specs = {'ukai:min_copies': '1'}
        self.driver.create_volume_from_snapshot(self.volume, snap)
        self.assertEqual(1, self.client.create_image.call_args[1]['min_copies'])

    def test_busy_keeps_ukais_words(self):
        self.client.delete_image.side_effect = ukai_client.UkaiError(409, 'image "v" has snapshots (s1, s2): delete them first')
        e = self.assertRaises(exception.VolumeIsBusy, self.driver.delete_volume, self.volume)
        self.assertIn('s1, s2', str(e))

    def test_encrypted_volumes_say_so(self):
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        vol = fake_volume.fake_volume_obj(self.ctx, encryption_key_id=fake.ENCRYPTION_KEY_ID,
                                          provider_auth='CHAP u s3cretsecret0001')
        conn = self.driver.initialize_connection(vol, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.assertTrue(conn['data']['encrypted'])
        conn = self.driver.initialize_connection(self.volume, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.assertFalse(conn['data']['encrypted'])

    def test_a_wildcard_portal_is_refused(self):
        nodes = [dict(NODES[0], iscsi_addr='0.0.0.0:3260')]
        self.client.nodes.return_value = nodes
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        e = self.assertRaises(exception.VolumeBackendAPIException, self.driver.initialize_connection,
                              self.volume, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.assertIn('iscsi.listen', str(e))
        self.client.export.assert_not_called()

    def test_stats_survive_an_unreachable_cluster(self):
        self.client.nodes.side_effect = ukai_client.UkaiError(None, 'connection refused')
        st = self.driver.get_volume_stats(refresh=True)
        self.assertEqual(0, st['total_capacity_gb'])
        self.client.nodes.side_effect = None
        self.client.images.return_value = []
        self.assertEqual(100.0, self.driver.get_volume_stats(refresh=True)['total_capacity_gb'])
        self.client.nodes.side_effect = ukai_client.UkaiError(503, 'metadata store unreachable')
        self.assertEqual(100.0, self.driver.get_volume_stats(refresh=True)['total_capacity_gb'])

    def test_extend_in_bytes(self):
        self.driver.extend_volume(self.volume, 5)
        self.client.resize.assert_called_once_with(self.volume.name, 5 * units.Gi)
        self.client.resize.side_effect = ukai_client.UkaiError(400, 'shrinking to 1 would lose data')
        e = self.assertRaises(exception.InvalidInput, self.driver.extend_volume, self.volume, 1)
        self.assertIn('would lose data', str(e))

    def test_delete(self):
        self.driver.delete_volume(self.volume)
        # At once by default; into ukai's trash with deferred deletion.
        self.client.delete_image.assert_called_once_with(self.volume.name, now=True)
        self.driver.configuration = make_config(ukai_deferred_deletion=True)
        self.driver.delete_volume(self.volume)
        self.client.delete_image.assert_called_with(self.volume.name, now=False)
        self.client.delete_image.side_effect = ukai_client.UkaiError(404, 'image not found')
        self.driver.delete_volume(self.volume)  # already gone: fine
        self.client.delete_image.side_effect = ukai_client.UkaiError(409, 'image has snapshots (s1): delete them first')
        self.assertRaises(exception.VolumeIsBusy, self.driver.delete_volume, self.volume)
        self.client.delete_image.side_effect = ukai_client.UkaiError(None, 'connection refused')
        e = self.assertRaises(exception.VolumeBackendAPIException, self.driver.delete_volume, self.volume)
        self.assertIn('connection refused', str(e))
        self.client.delete_image.side_effect = ukai_client.UkaiError(401, 'missing or invalid bearer token')
        self.assertRaises(exception.NotAuthorized, self.driver.delete_volume, self.volume)

    def test_snapshots(self):
        snap = fake_snapshot.fake_snapshot_obj(self.ctx, volume_id=self.volume.id)
        snap.volume = self.volume
        self.driver.create_snapshot(snap)
        self.client.create_snapshot.assert_called_once_with(self.volume.name, snap.name)
        self.client.delete_snapshot.side_effect = ukai_client.UkaiError(404, 'not found')
        self.driver.delete_snapshot(snap)
        self.client.delete_snapshot.side_effect = ukai_client.UkaiError(500, 'metadata store down')
        self.assertRaises(exception.VolumeBackendAPIException, self.driver.delete_snapshot, snap)

    def test_revert_to_snapshot(self):
        snap = fake_snapshot.fake_snapshot_obj(self.ctx, volume_id=self.volume.id)
        snap.volume = self.volume
        self.driver.revert_to_snapshot(self.ctx, self.volume, snap)
        self.assertEqual((self.volume.name, snap.name), self.client.revert_snapshot.call_args[0])
        self.client.revert_snapshot.side_effect = ukai_client.UkaiError(404, 'no snapshot v@s: image not found')
        e = self.assertRaises(exception.SnapshotNotFound, self.driver.revert_to_snapshot, self.ctx, self.volume, snap)
        self.assertIn('no snapshot', str(e))

    def test_create_export_makes_chap_credentials_once(self):
        vol = fake_volume.fake_volume_obj(self.ctx)
        upd = self.driver.create_export(self.ctx, vol, {})
        method, user, secret = upd['provider_auth'].split()
        self.assertEqual('CHAP', method)
        self.assertTrue(user.startswith('ukai-'))
        # At least 16 random bytes from the secrets module, in hex (no
        # character iscsiadm or a libiscsi URL could misread).
        self.assertGreaterEqual(len(secret), 32)
        int(secret, 16)
        real = ukai_driver.secrets.token_hex
        with mock.patch.object(ukai_driver.secrets, 'token_hex', side_effect=real) as tok:
            other = self.driver.create_export(self.ctx, fake_volume.fake_volume_obj(self.ctx), {})
        secret = other['provider_auth'].split()[2]
        nbytes = max(c.args[0] for c in tok.call_args_list)
        self.assertGreaterEqual(nbytes, 16)
        self.assertEqual(2 * nbytes, len(secret))
        self.assertNotEqual(upd, self.driver.create_export(self.ctx, vol, {}))
        self.assertIsNone(self.driver.create_export(self.ctx, self.volume, {}))

    def test_initialize_connection_on_the_hypervisors_node(self):
        self.client.image.return_value = {'iqn': 'iqn.x:' + self.volume.name,
                                          'locations': [{'node': 'n1'}, {'node': 'n3'}]}
        conn = self.driver.initialize_connection(self.volume, {'initiator': 'iqn.hv2', 'host': 'hv2.example.org'})
        self.assertEqual('iscsi', conn['driver_volume_type'])
        d = conn['data']
        self.assertEqual('127.0.0.1:3262', d['target_portal'])
        self.assertEqual('iqn.x:' + self.volume.name, d['target_iqn'])
        self.assertEqual(0, d['target_lun'])
        self.assertEqual(('CHAP', 'ukai-u1', 's3cretsecret0001'),
                         (d['auth_method'], d['auth_username'], d['auth_password']))
        self.client.export.assert_called_once_with(self.volume.name, 'iqn.hv2', chap_user='ukai-u1',
                                                   chap_secret='s3cretsecret0001')
        # hv2's node owns the image while the VM runs there; it holds no
        # copy, so the image follows the VM (locality best-effort, set again
        # for volumes made before it).
        self.client.attach.assert_called_once_with(self.volume.name, 'n2')
        self.client.set_policy.assert_called_once_with(self.volume.name, locality='best-effort')
        self.client.relocate.assert_not_called()

    def test_initialize_connection_without_follow_vm_or_with_a_copy(self):
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        self.driver.initialize_connection(self.volume, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.specs = {'ukai:follow_vm': 'false'}
        self.driver.initialize_connection(self.volume, {'initiator': 'iqn.hv2', 'host': 'hv2'})
        self.client.set_policy.assert_not_called()
        self.assertEqual([mock.call(self.volume.name, 'n1'), mock.call(self.volume.name, 'n2')],
                         self.client.attach.call_args_list)
        # An unknown host: a node holding a copy serves.
        conn = self.driver.initialize_connection(self.volume, {'initiator': 'iqn.x', 'host': 'elsewhere'})
        self.assertEqual('127.0.0.1:3261', conn['data']['target_portal'])

    def test_a_refused_attach_or_policy_does_not_fail_the_connection(self):
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        self.client.attach.side_effect = ukai_client.UkaiError(409, 'n2 is cordoned')
        self.client.set_policy.side_effect = ukai_client.UkaiError(400, 'locality: no')
        conn = self.driver.initialize_connection(self.volume, {'initiator': 'iqn.hv2', 'host': 'hv2'})
        self.assertEqual('127.0.0.1:3262', conn['data']['target_portal'])

    def test_initialize_connection_needs_an_initiator_and_credentials(self):
        self.assertRaises(exception.InvalidConnectorException, self.driver.initialize_connection,
                          self.volume, {'host': 'hv1'})
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        vol = fake_volume.fake_volume_obj(self.ctx)
        self.assertRaises(exception.VolumeBackendAPIException, self.driver.initialize_connection,
                          vol, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.client.export.assert_not_called()

    def test_without_chap(self):
        self.driver.configuration = make_config(ukai_chap=False)
        self.client.image.return_value = {'iqn': 'q', 'locations': [{'node': 'n1'}]}
        conn = self.driver.initialize_connection(fake_volume.fake_volume_obj(self.ctx),
                                                 {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.assertNotIn('auth_method', conn['data'])
        self.assertIsNone(self.client.export.call_args[1]['chap_user'])

    def test_terminate_connection(self):
        self.client.image.return_value = {'attached': 'n1'}
        self.driver.terminate_connection(self.volume, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.client.unexport.assert_called_once_with(self.volume.name, 'iqn.hv1')
        self.client.detach.assert_called_once_with(self.volume.name)
        # Attached elsewhere (a live migration moved it): left alone.
        self.client.detach.reset_mock()
        self.client.image.return_value = {'attached': 'n2'}
        self.driver.terminate_connection(self.volume, {'initiator': 'iqn.hv1', 'host': 'hv1'})
        self.client.detach.assert_not_called()
        self.client.unexport.reset_mock()
        self.driver.terminate_connection(self.volume, {'initiator': 'iqn.hv1'})
        self.client.unexport.assert_called_once_with(self.volume.name, 'iqn.hv1')
        self.client.unexport.reset_mock()
        self.client.image.return_value = {'exports': [{'initiator': 'a'}, {'initiator': 'b'}], 'attached': 'n2'}
        self.driver.terminate_connection(self.volume, None, force=True)
        self.assertEqual([mock.call(self.volume.name, 'a'), mock.call(self.volume.name, 'b')],
                         self.client.unexport.call_args_list)
        self.client.detach.assert_called_once_with(self.volume.name)  # force: nobody keeps it
        self.client.unexport.side_effect = ukai_client.UkaiError(404, 'no export')
        self.driver.terminate_connection(self.volume, {'initiator': 'iqn.hv1'})

    def test_stats(self):
        self.client.images.return_value = [{'size': 10 * units.Gi}, {'size': 5 * units.Gi},
                                           {'size': 10 * units.Gi, 'snapshot_of': 'v'}]
        st = self.driver.get_volume_stats(refresh=True)
        # Two live nodes of 100 GiB, two copies per volume.
        self.assertEqual(100.0, st['total_capacity_gb'])
        self.assertEqual(50.0, st['free_capacity_gb'])
        self.assertEqual(15.0, st['provisioned_capacity_gb'])
        self.assertTrue(st['thin_provisioning_support'])
        self.assertEqual('iSCSI', st['storage_protocol'])
        self.assertEqual('ukai', st['volume_backend_name'])

    def test_stats_report_qos_support(self):
        self.client.images.return_value = []
        self.assertTrue(self.driver.get_volume_stats(refresh=True)['QoS_support'])

    def _qos(self, consumer, **specs):
        self.qos = {'qos_specs': {'id': 'q1', 'name': 'gold', 'consumer': consumer,
                                  'specs': {k: str(v) for k, v in specs.items()}}}

    def test_create_volume_takes_the_back_end_qos_specs(self):
        self._qos('back-end', total_iops_sec=2000, read_bytes_sec=100 * units.Mi,
                  write_iops_sec=500, write_iops_sec_max=1500, write_iops_sec_max_length=4,
                  total_bytes_sec=200 * units.Mi, total_bytes_sec_max=400 * units.Mi)
        self.driver.create_volume(self.volume)
        self.client.set_qos.assert_called_once_with(
            self.volume.name, clear=False, iops_limit=2000, read_bw_limit=100 * units.Mi,
            write_iops_limit=500, write_iops_burst=6000,
            bw_limit=200 * units.Mi, bw_burst=400 * units.Mi)

    def test_both_is_back_end_too_front_end_is_not(self):
        self._qos('both', read_iops_sec=300)
        self.driver.create_volume(self.volume)
        self.client.set_qos.assert_called_once_with(self.volume.name, clear=False, read_iops_limit=300)
        self.client.set_qos.reset_mock()
        self._qos('front-end', read_iops_sec=300)
        self.driver.create_volume(self.volume)
        self.client.set_qos.assert_not_called()
        self.qos = {'qos_specs': None}
        self.driver.create_volume(self.volume)
        self.client.set_qos.assert_not_called()

    def test_bad_qos_specs_create_nothing(self):
        for specs in ({'total_iops_sec_per_gb': '10'}, {'size_iops_sec': '4096'},
                      {'read_iops_sec': 'lots'}, {'write_bytes_sec': '-1'},
                      {'total_iops_sec_max': '500'}):
            self._qos('back-end', **specs)
            self.assertRaises(exception.InvalidVolumeType, self.driver.create_volume, self.volume)
        self.client.create_image.assert_not_called()
        self.client.set_qos.assert_not_called()

    def test_a_refused_qos_deletes_the_new_image(self):
        self._qos('back-end', total_iops_sec=2000)
        self.client.set_qos.side_effect = ukai_client.UkaiError(400, 'qos: no')
        self.assertRaises(exception.InvalidInput, self.driver.create_volume, self.volume)
        self.client.delete_image.assert_called_once_with(self.volume.name, now=True)

    def test_retype_changes_only_qos_in_place(self):
        new_type = {'id': fake.VOLUME_TYPE2_ID, 'name': 'gold'}
        self._qos('back-end', total_iops_sec=800)
        diff = {'extra_specs': {'other:thing': ('a', 'b'), 'ukai:replicas': ('2', '2')},
                'qos_specs': {'total_iops_sec': (None, '800')}, 'encryption': {}}
        self.assertEqual((True, None), self.driver.retype(self.ctx, self.volume, new_type, diff, {}))
        self.client.set_qos.assert_called_once_with(self.volume.name, clear=True, iops_limit=800)
        # To a type without QoS: the limits go.
        self.client.set_qos.reset_mock()
        self.qos = {'qos_specs': None}
        self.assertEqual((True, None), self.driver.retype(self.ctx, self.volume, new_type, {}, {}))
        self.client.set_qos.assert_called_once_with(self.volume.name, clear=True)

    def test_retype_of_ukai_specs_is_left_to_migration(self):
        self._qos('back-end', total_iops_sec=800)
        diff = {'extra_specs': {'ukai:replicas': ('2', '3')}, 'qos_specs': {}}
        self.assertEqual((False, None),
                         self.driver.retype(self.ctx, self.volume, {'id': fake.VOLUME_TYPE2_ID}, diff, {}))
        self.client.set_qos.assert_not_called()

    def test_copy_image_to_volume_streams_the_raw_image(self):
        written = {}

        def fetch(ctx, svc, image_id, dest, bs, size=None, run_as_root=True):
            self.assertFalse(run_as_root)
            with open(dest, 'wb') as f:
                f.write(b'raw image bytes')

        def write(name, f, timeout=None):
            written[name] = f.read()

        self.mock_object(ukai_driver.image_utils, 'fetch_to_raw', side_effect=fetch)
        self.client.write_data.side_effect = write
        with tempfile.TemporaryDirectory() as d:
            self.flags(image_conversion_dir=d)
            self.driver.copy_image_to_volume(self.ctx, self.volume, mock.Mock(), fake.IMAGE_ID)
            self.assertEqual([], os.listdir(d))
        self.assertEqual({self.volume.name: b'raw image bytes'}, written)

    def test_copy_volume_to_image_uploads_what_ukai_streams(self):
        uploaded = {}

        def read(name, out, timeout=None):
            out.write(b'volume bytes')

        def upload(ctx, svc, meta, path, volume, run_as_root=True):
            self.assertFalse(run_as_root)
            with open(path, 'rb') as f:
                uploaded[meta['id']] = f.read()

        self.client.read_data.side_effect = read
        self.mock_object(ukai_driver.volume_utils, 'upload_volume', side_effect=upload)
        with tempfile.TemporaryDirectory() as d:
            self.flags(image_conversion_dir=d)
            self.driver.copy_volume_to_image(self.ctx, self.volume, mock.Mock(), {'id': 'img1'})
        self.assertEqual({'img1': b'volume bytes'}, uploaded)


class _API(http.server.BaseHTTPRequestHandler):
    """A ukai API stand-in answering with a fixed status and body."""
    answers = {}
    seen = []

    def _answer(self):
        if self.path == '/v1/images/sparse/data':
            data = b'\1' * 4096 + b'\0' * (8 << 20) + b'\2' * 4096
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        n = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(n) if n else b''
        type(self).seen.append((self.command, self.path, self.headers.get('Authorization'), body))
        status, payload = type(self).answers.get((self.command, self.path), (404, {'error': 'no such API endpoint'}))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = _answer

    def log_message(self, *args):
        pass


class UkaiClientTestCase(test.TestCase):
    """The client over real HTTP: address failover, token, error text."""

    def setUp(self):
        super(UkaiClientTestCase, self).setUp()
        _API.seen = []
        _API.answers = {
            ('GET', '/v1/version'): (200, {'version': 'test', 'api': 'v1'}),
            ('DELETE', '/v1/images/v1'): (409, {'error': 'image "v1" has snapshots (s1): delete them first'}),
        }
        self.srv = http.server.HTTPServer(('127.0.0.1', 0), _API)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.addCleanup(self.srv.server_close)
        self.addCleanup(self.srv.shutdown)
        # A loopback port nobody listens on.
        s = socket.socket()
        s.bind(('127.0.0.1', 0))
        self.dead = '127.0.0.1:%d' % s.getsockname()[1]
        s.close()
        self.live = '127.0.0.1:%d' % self.srv.server_address[1]

    def test_cleartext_api_refused_unless_allowed(self):
        for addr in (self.live, 'http://' + self.live, 'HTTP://10.0.0.1:7700'):
            e = self.assertRaises(ukai_client.UkaiError, ukai_client.Client, [addr])
            self.assertIn('ukai_api_allow_insecure', str(e))
        # One cleartext address among https ones is refused too.
        self.assertRaises(ukai_client.UkaiError, ukai_client.Client,
                          ['https://10.0.0.1:7700', 'http://10.0.0.2:7700'])
        c = ukai_client.Client(['https://10.0.0.1:7700', 'HTTPS://10.0.0.2:7700/'])
        self.assertEqual(['https://10.0.0.1:7700', 'HTTPS://10.0.0.2:7700'], c.addresses)
        c = ukai_client.Client([self.live], allow_insecure=True)
        self.assertEqual('v1', c.version()['api'])
        # The driver: refused at setup, with the option's name.
        d = ukai_driver.UkaiISCSIDriver(configuration=make_config(ukai_api_addresses=[self.live]))
        e = self.assertRaises(exception.VolumeDriverException, d.do_setup, None)
        self.assertIn('ukai_api_allow_insecure', str(e))
        d = ukai_driver.UkaiISCSIDriver(configuration=make_config(ukai_api_addresses=[self.live],
                                                                  ukai_api_allow_insecure=True))
        d.do_setup(None)
        d.check_for_setup_error()
        # The default address is https.
        self.assertTrue(all(a.startswith('https://') for a in
                            make_config().ukai_api_addresses))

    def test_set_qos_sends_the_limits(self):
        _API.answers[('PUT', '/v1/images/v1/qos')] = (200, {'iops_limit': 2000})
        c = ukai_client.Client([self.live], allow_insecure=True)
        self.assertEqual({'iops_limit': 2000}, c.set_qos('v1', clear=True, iops_limit=2000))
        method, path, _, body = _API.seen[-1]
        self.assertEqual(('PUT', '/v1/images/v1/qos'), (method, path))
        self.assertEqual({'iops_limit': 2000, 'clear': True}, json.loads(body))

    def test_first_address_that_answers_serves(self):
        c = ukai_client.Client([self.dead, self.live], token='tok', allow_insecure=True)
        self.assertEqual('v1', c.version()['api'])
        self.assertEqual('Bearer tok', _API.seen[0][2])

    def test_an_error_answer_is_final_and_keeps_ukais_words(self):
        c = ukai_client.Client([self.live, self.dead], allow_insecure=True)
        e = self.assertRaises(ukai_client.UkaiError, c.delete_image, 'v1', now=False)
        self.assertEqual(409, e.status)
        self.assertIn('has snapshots (s1)', str(e))
        self.assertEqual(1, len(_API.seen))

    def test_nobody_answers(self):
        c = ukai_client.Client([self.dead], allow_insecure=True)
        e = self.assertRaises(ukai_client.UkaiError, c.version)
        self.assertIsNone(e.status)
        self.assertIn(self.dead, str(e))

    def test_read_data_leaves_holes_for_zeros(self):
        c = ukai_client.Client([self.live], allow_insecure=True)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, 'out')
            with open(p, 'wb') as f:
                got = c.read_data('sparse', f, chunk=1 << 20)
            self.assertEqual(8 * 1024 * 1024 + 8192, got)
            with open(p, 'rb') as f:
                data = f.read()
            self.assertEqual(b'\1' * 4096 + b'\0' * (8 << 20) + b'\2' * 4096, data)
            self.assertLess(os.stat(p).st_blocks * 512, 4 << 20)

    def test_token_file_must_not_be_world_readable(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, 'token')
            with open(p, 'w') as f:
                f.write('tok\n')
            os.chmod(p, 0o644)
            self.assertRaises(ukai_client.UkaiError, ukai_client.read_token, p)
            os.chmod(p, 0o600)
            self.assertEqual('tok', ukai_client.read_token(p))

    def test_driver_setup_reports_an_unreachable_cluster(self):
        d = ukai_driver.UkaiISCSIDriver(configuration=make_config(ukai_api_addresses=[self.dead],
                                                                  ukai_api_allow_insecure=True))
        d.do_setup(None)
        e = self.assertRaises(exception.VolumeBackendAPIException, d.check_for_setup_error)
        self.assertIn('unreachable', str(e))
        d = ukai_driver.UkaiISCSIDriver(configuration=make_config(ukai_api_addresses=[self.live],
                                                                  ukai_api_allow_insecure=True))
        d.do_setup(None)
        d.check_for_setup_error()
