"""End to end: Cinder's volume manager drives the ukai driver against a
real ukai cluster (real processes, real Consul), and real iSCSI clients
(libiscsi's iscsi-inq and iscsi-readcapacity16, qemu-io) use exactly the
connection data initialize_connection returned, with CHAP.

The cluster is started by the Go test TestCinderDriverEndToEnd
(integration/cinder_test.go), which runs this module with:

  UKAI_E2E_API          comma-separated API addresses (https URLs)
  UKAI_E2E_TOKEN_FILE   the API's bearer token file
  UKAI_E2E_CA           the cluster CA (the API speaks TLS)
  UKAI_E2E_HOSTS        hypervisor hosts, comma-separated; each ukai node is
                        labelled host=<one of them>
"""

import cinder.tests.unit  # noqa: F401  (eventlet first)

import os
import shutil
import subprocess
import tempfile
import time
from unittest import mock

from oslo_utils import importutils
from oslo_utils import units

from cinder import context
from cinder import exception
from cinder import objects
from cinder.objects import fields
from cinder.tests.unit import test
from cinder.tests.unit import utils as tests_utils
from cinder.volume import configuration
from cinder.volume import manager as volume_manager  # noqa: F401 (registers volume_driver)
from cinder.volume import volume_types

from ukai_cinder import client as ukai_client
from ukai_cinder import driver as ukai_driver  # noqa: F401 (registers the ukai options)

MiB = 1 << 20


def env(name):
    v = os.environ.get(name)
    if not v:
        raise RuntimeError('%s is not set: run this test through '
                           '`go test ./integration -run TestCinderDriverEndToEnd`' % name)
    return v


def run(*args, check=True, timeout=120):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = p.stdout.decode(errors='replace')
    if check and p.returncode != 0:
        raise AssertionError('%s failed (%d):\n%s' % (' '.join(args), p.returncode, out))
    return p.returncode, out


def iscsi_url(data, initiator_secret=True):
    cred = ''
    if data.get('auth_method') == 'CHAP' and initiator_secret:
        cred = '%s%%%s@' % (data['auth_username'], data['auth_password'])
    return 'iscsi://%s%s/%s/%d' % (cred, data['target_portal'], data['target_iqn'], data['target_lun'])


def qemu_io(data, initiator, *cmds, expect_ok=True):
    """qemu-io on the connection data, exactly as returned."""
    args = ['qemu-io', '--object', 'secret,id=s0,data=' + data['auth_password'], '--image-opts']
    for c in cmds:
        args += ['-c', c]
    args.append('driver=iscsi,transport=tcp,portal=%s,target=%s,lun=%d,initiator-name=%s,user=%s,password-secret=s0'
                % (data['target_portal'], data['target_iqn'], data['target_lun'], initiator, data['auth_username']))
    code, out = run(*args, check=False)
    ok = code == 0 and 'failed' not in out and 'Pattern verification' not in out
    if ok != expect_ok:
        raise AssertionError('qemu-io %s: expected %s, got exit %d:\n%s'
                             % (cmds, 'success' if expect_ok else 'failure', code, out))
    return out


class ImageService(object):
    """What Cinder calls of Glance when copying images: data kept here."""

    temp_images = None  # Cinder caches downloads here when set

    def __init__(self):
        self.images = {}

    def show(self, ctx, image_id):
        data = self.images[image_id]
        return {'id': image_id, 'status': 'active', 'disk_format': 'raw', 'container_format': 'bare',
                'size': len(data), 'properties': {}}

    def download(self, ctx, image_id, data=None):
        data.write(self.images[image_id])

    def update(self, ctx, image_id, meta, data=None, **kwargs):
        self.images[image_id] = data.read()
        return self.show(ctx, image_id)


class UkaiEndToEnd(test.TestCase):

    def setUp(self):
        super(UkaiEndToEnd, self).setUp()
        self.hosts = env('UKAI_E2E_HOSTS').split(',')
        self.flags(volume_driver='ukai_cinder.driver.UkaiISCSIDriver', group=configuration.SHARED_CONF_GROUP)
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.flags(volumes_dir=self.tmp, image_conversion_dir=self.tmp)
        self.manager = importutils.import_object('cinder.volume.manager.VolumeManager')
        self.flags(ukai_api_addresses=env('UKAI_E2E_API').split(','),
                   ukai_token_file=env('UKAI_E2E_TOKEN_FILE'), ukai_ca_file=env('UKAI_E2E_CA'),
                   ukai_default_replicas=2, group=self._driver_group())
        self.manager.message_api = mock.Mock()
        # What init_host would have set (as Cinder's own volume tests do).
        self.manager.stats = {'allocated_capacity_gb': 0, 'pools': {}}
        self.ctx = context.get_admin_context()
        self.ctx.user_id = 'e2e-user'
        self.ctx.project_id = 'e2e-project'
        drv = self.manager.driver
        drv.do_setup(self.ctx)
        drv.check_for_setup_error()
        drv.set_initialized()
        self.ukai = drv.client
        self.vtype = volume_types.create(self.ctx, 'ukai-two-copies', {
            'ukai:replicas': '2', 'ukai:locations': 'n1,n2', 'ukai:min_copies': '1', 'ukai:block_size': str(MiB)})

    def _wait(self, cond, what, timeout=20):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                self.fail('timed out waiting for ' + what)
            time.sleep(0.1)

    def _driver_group(self):
        """The option group the manager's driver reads (the backend's
        section, else the shared backend defaults)."""
        return self.manager.driver.configuration.config_group or configuration.SHARED_CONF_GROUP

    def _volume(self, **kw):
        vol = tests_utils.create_volume(self.ctx, size=kw.pop('size', 1), status='creating',
                                        host=self.manager.host, volume_type_id=self.vtype['id'], **kw)
        self.manager.create_volume(self.ctx, vol)
        vol = objects.Volume.get_by_id(self.ctx, vol.id)
        self.assertEqual('available', vol.status, 'volume %s: %s' % (vol.name, vol.status))
        return vol

    def _attach(self, vol, host):
        connector = {'initiator': 'iqn.2026-11.org.openstack:' + host, 'host': host, 'ip': '127.0.0.1'}
        conn = self.manager.initialize_connection(self.ctx, vol, connector)
        self.assertEqual('iscsi', conn['driver_volume_type'])
        self.assertEqual('CHAP', conn['data']['auth_method'])
        return connector, conn['data']

    def test_volume_lifecycle(self):
        hv1 = self.hosts[0]
        vol = self._volume()
        img = self.ukai.image(vol.name)
        self.assertEqual(1 * units.Gi, img['size'])
        self.assertEqual(['n1', 'n2'], [loc['node'] for loc in img['locations']])

        # Attach on hv1: the connection data lead to the node of hv1.
        connector, data = self._attach(vol, hv1)
        node = [n for n in self.ukai.nodes() if n['labels'].get('host') == hv1][0]
        self.assertEqual(node['iscsi_addr'], data['target_portal'])
        ini = connector['initiator']
        qemu_io(data, ini, 'write -P 0x5a 0 4M', 'write -P 0x5b 512M 1M', 'flush')
        run('iscsi-inq', '-i', ini, iscsi_url(data))
        # A wrong initiator, or no CHAP, is refused.
        code, _ = run('iscsi-inq', '-i', 'iqn.2026-11.org.openstack:intruder', iscsi_url(data), check=False)
        self.assertNotEqual(0, code, 'a stranger initiator was admitted')
        code, _ = run('iscsi-inq', '-i', ini, iscsi_url(data, initiator_secret=False), check=False)
        self.assertNotEqual(0, code, 'a login without CHAP was admitted')

        # Snapshot while attached, then write more.
        snap = tests_utils.create_snapshot(self.ctx, vol.id, status=fields.SnapshotStatus.CREATING)
        self.manager.create_snapshot(self.ctx, snap)
        snap = objects.Snapshot.get_by_id(self.ctx, snap.id)
        self.assertEqual(fields.SnapshotStatus.AVAILABLE, snap.status)
        qemu_io(data, ini, 'write -P 0x6c 0 2M', 'flush')

        # A volume from the snapshot holds the old data; a clone the new.
        from_snap = self._volume(snapshot_id=snap.id)
        fc, fdata = self._attach(from_snap, hv1)
        qemu_io(fdata, fc['initiator'], 'read -P 0x5a 0 4M', 'read -P 0x5b 512M 1M')
        clone = self._volume(source_volid=vol.id)
        cc, cdata = self._attach(clone, hv1)
        qemu_io(cdata, cc['initiator'], 'read -P 0x6c 0 2M', 'read -P 0x5a 2M 2M', 'read -P 0x5b 512M 1M')

        # Online extend: the LUN grows, the data stays, the new part is usable.
        with mock.patch('cinder.volume.manager.QUOTAS'):
            self.manager.extend_volume(self.ctx, vol, 2, None)
        vol = objects.Volume.get_by_id(self.ctx, vol.id)
        self.assertEqual(2, vol.size)
        _, out = run('iscsi-readcapacity16', '-i', ini, iscsi_url(data))
        self.assertIn('Totalsize:%d' % (2 * units.Gi), out.replace(' ', ''))
        qemu_io(data, ini, 'read -P 0x6c 0 2M', 'write -P 0x7d 1536M 1M', 'read -P 0x7d 1536M 1M', 'flush')

        # Revert to the snapshot through Cinder's manager (it takes and
        # deletes a backup snapshot around the driver's revert): the old
        # data is back, the part extended since reads as zeros.
        vol.status = 'reverting'
        vol.save()
        snap.status = fields.SnapshotStatus.RESTORING
        snap.save()
        self.manager.revert_to_snapshot(self.ctx, vol, snap)
        vol = objects.Volume.get_by_id(self.ctx, vol.id)
        self.assertEqual('available', vol.status)
        qemu_io(data, ini, 'read -P 0x5a 0 4M', 'read -P 0x5b 512M 1M', 'read -P 0 1536M 1M')
        self.assertEqual([snap.name], [s['name'] for s in self.ukai.snapshots(vol.name)])

        # Volume -> image -> volume, streamed through the ukai API.
        images = ImageService()
        meta = {'id': 'img-1', 'disk_format': 'raw', 'container_format': 'bare'}
        images.images['img-1'] = b''
        self.manager.driver.copy_volume_to_image(self.ctx, from_snap, images, meta)
        self.assertEqual(1 * units.Gi, len(images.images['img-1']))
        self.assertEqual(b'\x5a' * (4 * MiB), images.images['img-1'][:4 * MiB])
        restored = self._volume(size=1)
        self.manager.driver.copy_image_to_volume(self.ctx, restored, images, 'img-1')
        rc, rdata = self._attach(restored, self.hosts[1])
        qemu_io(rdata, rc['initiator'], 'read -P 0x5a 0 4M', 'read -P 0x5b 512M 1M', 'read -P 0 4M 4M')

        # Stats reflect the cluster.
        st = self.manager.driver.get_volume_stats(refresh=True)
        self.assertGreater(st['total_capacity_gb'], 0)
        self.assertGreaterEqual(st['provisioned_capacity_gb'], 5)

        # A live session (qemu-nbd holds one) on the node of hv1.
        sock = os.path.join(self.tmp, 'nbd.sock')
        nbd = subprocess.Popen(['qemu-nbd', '--object', 'secret,id=s0,data=' + data['auth_password'], '--image-opts',
                                '-k', sock, '--persistent',
                                'driver=iscsi,transport=tcp,portal=%s,target=%s,lun=0,initiator-name=%s,user=%s,password-secret=s0'
                                % (data['target_portal'], data['target_iqn'], ini, data['auth_username'])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(nbd.wait)
        self.addCleanup(nbd.kill)
        scheme = self.ukai.addresses[0].split('://')[0]
        node_api = ukai_client.Client([scheme + '://' + node['api_addr']], token=self.ukai.token, ca_file=env('UKAI_E2E_CA'))

        def sessions():
            return [x for x in node_api.request('GET', '/v1/node').get('sessions') or []
                    if x['initiator'] == ini and x['target'] == data['target_iqn']]
        self._wait(lambda: sessions(), 'the qemu-nbd session to log in')

        # Detach: the live session ends, and the initiator is refused from then on.
        self.manager.terminate_connection(self.ctx, vol.id, connector)
        self._wait(lambda: not sessions(), 'the session to end after terminate_connection')
        code, _ = run('iscsi-inq', '-i', ini, iscsi_url(data), check=False)
        self.assertNotEqual(0, code, 'the initiator still logs in after terminate_connection')
        qemu_io(data, ini, 'read 0 512', expect_ok=False)

        # A volume with a snapshot cannot go; then everything goes.
        self.assertRaises(exception.VolumeIsBusy, self.manager.driver.delete_volume, vol)
        for v, c in ((from_snap, fc), (clone, cc), (restored, rc)):
            self.manager.terminate_connection(self.ctx, v.id, c)
            self.manager.delete_volume(self.ctx, v)
        self.manager.delete_snapshot(self.ctx, snap)
        self.manager.delete_volume(self.ctx, objects.Volume.get_by_id(self.ctx, vol.id))
        left = [i['name'] for i in self.ukai.images()]
        self.assertEqual([], left)
        # Deleting what is gone is fine (Cinder retries deletes).
        self.manager.driver.delete_volume(vol)

    def test_follow_the_vm(self):
        """A one-copy volume on hv1's node, attached on hv2: the connection
        goes to hv2's node at once, which owns the image (attached there)
        and serves it from n1's copy; the locality policy moves the copy
        there in the background (after the nodes' locality_delay)."""
        one = volume_types.create(self.ctx, 'ukai-one-copy', {
            'ukai:replicas': '1', 'ukai:locations': 'n1', 'ukai:block_size': str(MiB)})
        vol = tests_utils.create_volume(self.ctx, size=1, status='creating', host=self.manager.host,
                                        volume_type_id=one['id'])
        self.manager.create_volume(self.ctx, vol)
        vol = objects.Volume.get_by_id(self.ctx, vol.id)
        self.addCleanup(self.manager.driver.delete_volume, vol)
        c1, d1 = self._attach(vol, self.hosts[0])
        qemu_io(d1, c1['initiator'], 'write -P 0x3c 0 8M', 'flush')
        self.manager.terminate_connection(self.ctx, vol.id, c1)
        # The VM moves to hv2.
        c2, d2 = self._attach(vol, self.hosts[1])
        hv2 = [n for n in self.ukai.nodes() if n['labels'].get('host') == self.hosts[1]][0]
        self.assertEqual(hv2['iscsi_addr'], d2['target_portal'])
        qemu_io(d2, c2['initiator'], 'read -P 0x3c 0 8M')

        def moved():
            img = self.ukai.image(vol.name)
            return [loc['node'] for loc in img['locations']] == [hv2['name']] and \
                all(loc['out_of_sync'] == 0 for loc in img['locations'])
        self._wait(moved, 'the copy to move to ' + hv2['name'], timeout=90)
        qemu_io(d2, c2['initiator'], 'read -P 0x3c 0 8M', 'write -P 0x3d 8M 1M', 'flush')
        self.manager.terminate_connection(self.ctx, vol.id, c2)

    def test_errors_keep_ukais_words(self):
        vol = tests_utils.create_volume(self.ctx, size=1, status='creating', host=self.manager.host,
                                        volume_type_id=self.vtype['id'])
        self.manager.driver.create_volume(vol)
        self.addCleanup(self.manager.driver.delete_volume, vol)
        # The same name again: ukai says it exists.
        e = self.assertRaises(exception.VolumeBackendAPIException, self.manager.driver.create_volume, vol)
        self.assertIn(vol.name, str(e))
        # Shrinking is refused with ukai's reason.
        self.ukai.resize(vol.name, 2 * units.Gi)
        e = self.assertRaises(exception.InvalidInput, self.manager.driver.extend_volume, vol, 1)
        self.assertIn('shrinking', str(e))
        # A type naming an unknown node.
        bad = volume_types.create(self.ctx, 'ukai-bad', {'ukai:locations': 'n1,nowhere'})
        v2 = tests_utils.create_volume(self.ctx, size=1, status='creating', host=self.manager.host,
                                       volume_type_id=bad['id'])
        e = self.assertRaises(exception.CinderException, self.manager.driver.create_volume, v2)
        self.assertIn('nowhere', str(e))
        self.assertNotIn(v2.name, [i['name'] for i in self.ukai.images()])
        # A wrong token.
        c = ukai_client.Client(self.ukai.addresses, token='not-the-token', ca_file=env('UKAI_E2E_CA'))
        err = self.assertRaises(ukai_client.UkaiError, c.images)
        self.assertEqual(401, err.status)
