"""Cinder volume driver for ukai.

A Cinder volume is a ukai image named after the volume (``volume.name``);
a Cinder snapshot is the ukai snapshot VOLUME@SNAPSHOT (snapshots are
named per image), and revert_to_snapshot reverts the image in place on
ukai's side (no temporary volume, no copy through the host). Attaching
exports the image to the connector's initiator (with CHAP) and returns the
iSCSI portal of the ukai node on the connector's host, so the hypervisor
talks to its local node, and attaches the image there (that node owns it
while the VM runs; terminate_connection detaches it). Follow the VM: the
image's locality policy is best-effort, so once its owner has held it
without a copy for the nodes' placement.locality_delay, ukai adds a copy
there and drops one elsewhere, within the operator's sync windows and
bandwidth caps.

Volume type extra specs (all optional):

  ukai:replicas      number of copies the placement keeps (default:
                     ukai_default_replicas)
  ukai:locations     comma-separated nodes for the first copies
  ukai:min_copies    copies a write must reach to be acknowledged
  ukai:block_size    bytes per block (a power of two, 64 KiB to 64 MiB)
  ukai:sync_window   comma-separated daily windows for background copying,
                     e.g. "22:00-06:00"
  ukai:sync_tz       time zone of the windows (IANA name)
  ukai:max_rate      bandwidth cap of background copying, e.g. "50MiB/s"
  ukai:follow_vm     "false": locality off (no copy follows the VM)

QoS specs of the volume type whose consumer is "back-end" or "both" become
the image's I/O limits, enforced by its owner (docs/qos.md), on create and
on retype (in place when nothing but QoS changes):

  total_iops_sec, read_iops_sec, write_iops_sec      operations per second
  total_bytes_sec, read_bytes_sec, write_bytes_sec   bytes per second
  <any of them>_max                                  its burst rate, held
                                                     for <key>_max_length
                                                     seconds (default 1)

Other keys (per-GB limits, size_iops_sec) are refused, not ignored.
"""

import secrets

from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from cinder.common import constants
from cinder import exception
from cinder.i18n import _
from cinder.image import image_utils
from cinder import interface
from cinder.volume import configuration
from cinder.volume import driver
from cinder.volume import volume_types
from cinder.volume import volume_utils

from ukai_cinder import client as ukai_client

LOG = logging.getLogger(__name__)

ukai_opts = [
    cfg.ListOpt('ukai_api_addresses', default=['https://127.0.0.1:7700'],
                help='ukai control API addresses (https:// URLs), tried '
                     'in order: any node serves the whole API.'),
    cfg.BoolOpt('ukai_api_allow_insecure', default=False,
                help='Allow API addresses without https:// (cleartext '
                     'HTTP: the bearer token and the CHAP secrets the '
                     'driver sends travel unencrypted). Only for a test '
                     'cluster on loopback.'),
    cfg.StrOpt('ukai_token_file',
               help='File holding the bearer token of the ukai API (not '
                    'world-readable).'),
    cfg.StrOpt('ukai_ca_file',
               help='CA bundle to verify an https ukai API.'),
    cfg.IntOpt('ukai_api_timeout', default=60, min=1,
               help='Seconds to wait for an API answer.'),
    cfg.IntOpt('ukai_copy_timeout', default=6 * 3600, min=1,
               help='Seconds a data copy (clone, image transfer) may take.'),
    cfg.IntOpt('ukai_default_replicas', default=2, min=1,
               help='Copies per volume when the volume type does not say '
                    '(ukai:replicas).'),
    cfg.IntOpt('ukai_default_min_copies', default=1, min=1,
               help='Copies a write must reach when the volume type does '
                    'not say (ukai:min_copies).'),
    cfg.ListOpt('ukai_default_locations', default=[],
                help='Nodes for the first copies of a new volume when the '
                     'volume type does not say (ukai:locations); empty: '
                     'the node answering the API.'),
    cfg.StrOpt('ukai_host_label', default='host',
               help='ukai node label that names the hypervisor host the '
                    'node runs on. A node whose name is the host (or its '
                    'short name) matches too.'),
    cfg.BoolOpt('ukai_follow_vm', default=True,
                help='Give volumes the locality policy best-effort: a '
                     'copy follows the node of the hypervisor the volume '
                     'is attached on (after the nodes\' '
                     'placement.locality_delay).'),
    cfg.BoolOpt('ukai_deferred_deletion', default=False,
                help='Deleting a volume moves its image to ukai\'s trash, '
                     'purged after the nodes\' trash.defer (ukai trash '
                     'restore brings it back meanwhile). Off: the image '
                     'and its data are deleted at once, as Cinder expects '
                     'of the space it reports.'),
    cfg.BoolOpt('ukai_chap', default=True,
                help='Protect every export with CHAP (per-volume '
                     'credentials). The ukai nodes must run with '
                     'iscsi.chap_secret_store: consul.'),
]

CONF = cfg.CONF
# Cinder builds a driver's configuration from its backend section, falling
# back to [backend_defaults].
CONF.register_opts(ukai_opts, group=configuration.SHARED_CONF_GROUP)

SPEC_PREFIX = 'ukai:'
# Random bytes of a volume's CHAP secret (given in hex): RFC 7143 12.1.3
# asks for at least 96 bits of randomness.
CHAP_SECRET_BYTES = 16
SPECS = ('replicas', 'locations', 'min_copies', 'block_size', 'sync_window',
         'sync_tz', 'max_rate', 'follow_vm')

# Cinder's back-end QoS keys and the ukai limits they set (PUT
# /v1/images/{name}/qos); a burst is the <key>_max rate times
# <key>_max_length seconds.
QOS_LIMITS = {
    'total_iops_sec': ('iops_limit', 'iops_burst'),
    'read_iops_sec': ('read_iops_limit', 'read_iops_burst'),
    'write_iops_sec': ('write_iops_limit', 'write_iops_burst'),
    'total_bytes_sec': ('bw_limit', 'bw_burst'),
    'read_bytes_sec': ('read_bw_limit', 'read_bw_burst'),
    'write_bytes_sec': ('write_bw_limit', 'write_bw_burst'),
}
QOS_CONSUMERS = ('back-end', 'both')


def _gib(n):
    return round(float(n) / units.Gi, 2)


@interface.volumedriver
class UkaiISCSIDriver(driver.ISCSIDriver):
    """ukai: distributed local storage for VM disk images, over iSCSI."""

    VERSION = '1.0.0'
    CI_WIKI_NAME = 'ukai_CI'
    # A thin-provisioned, replicated block store.
    SUPPORTS_ACTIVE_ACTIVE = False

    def __init__(self, *args, **kwargs):
        super(UkaiISCSIDriver, self).__init__(*args, **kwargs)
        self.configuration.append_config_values(ukai_opts)
        self.client = None
        self._stats = {}

    @staticmethod
    def get_driver_options():
        return ukai_opts

    # Setup.
    def do_setup(self, context):
        conf = self.configuration
        token = None
        try:
            if conf.ukai_token_file:
                token = ukai_client.read_token(conf.ukai_token_file)
            self.client = ukai_client.Client(
                conf.ukai_api_addresses, token=token,
                ca_file=conf.ukai_ca_file, timeout=conf.ukai_api_timeout,
                allow_insecure=conf.ukai_api_allow_insecure)
        except (OSError, ukai_client.UkaiError) as e:
            raise exception.VolumeDriverException(
                message=_('ukai driver setup: %s') % e)

    def check_for_setup_error(self):
        v = self._call(self.client.version)
        LOG.info('ukai API %(api)s, version %(v)s',
                 {'api': v.get('api'), 'v': v.get('version')})

    # Errors.
    def _call(self, fn, *args, **kwargs):
        """Run a client call; map ukai's errors to Cinder's (see _mapped).
        not_found, busy: (exception class, kwargs) for 404 and 409."""
        not_found = kwargs.pop('not_found', None)
        busy = kwargs.pop('busy', None)
        try:
            return fn(*args, **kwargs)
        except ukai_client.UkaiError as e:
            raise self._mapped(e, not_found, busy)

    @staticmethod
    def _mapped(e, not_found=None, busy=None):
        """The Cinder exception for a ukai error, with ukai's message.
        not_found, busy: exception classes and their arguments for 404
        and 409 answers, as (class, kwargs)."""
        if e.status == 404 and not_found is not None:
            cls, kw = not_found
            return cls(message=_('ukai: %s') % e.message, **kw)
        if e.status == 409 and busy is not None:
            cls, kw = busy
            return cls(message=_('ukai: %s') % e.message, **kw)
        if e.status == 400:
            return exception.InvalidInput(reason=_('ukai: %s') % e.message)
        if e.status in (401, 403):
            return exception.NotAuthorized(
                message=_('ukai refused the driver\'s token: %s') % e.message)
        return exception.VolumeBackendAPIException(data=str(e))

    # Volume types.
    def _specs(self, volume):
        """The ukai extra specs of the volume's type, checked."""
        raw = {}
        type_id = volume.get('volume_type_id')
        if type_id:
            raw = volume_types.get_volume_type_extra_specs(type_id) or {}
        specs = {}
        for key, value in raw.items():
            if not key.startswith(SPEC_PREFIX):
                continue
            name = key[len(SPEC_PREFIX):]
            if name not in SPECS:
                raise exception.InvalidVolumeType(
                    reason=_('unknown extra spec %(k)s (ukai knows %(all)s)') %
                    {'k': key, 'all': ', '.join(SPEC_PREFIX + s for s in SPECS)})
            specs[name] = str(value).strip()
        out = {
            'given': set(specs),
            'replicas': self.configuration.ukai_default_replicas,
            'min_copies': self.configuration.ukai_default_min_copies,
            'locations': list(self.configuration.ukai_default_locations or []),
            'follow_vm': self.configuration.ukai_follow_vm,
        }
        for name in ('replicas', 'min_copies', 'block_size'):
            if name in specs:
                try:
                    out[name] = int(specs[name])
                except ValueError:
                    raise exception.InvalidVolumeType(
                        reason=_('ukai:%(n)s=%(v)r is not a whole number') %
                        {'n': name, 'v': specs[name]})
                if out[name] < 1:
                    raise exception.InvalidVolumeType(
                        reason=_('ukai:%(n)s must be at least 1') % {'n': name})
        if 'locations' in specs:
            out['locations'] = [x.strip() for x in specs['locations'].split(',') if x.strip()]
        if 'sync_window' in specs:
            out['sync_window'] = [x.strip() for x in specs['sync_window'].split(',') if x.strip()]
        for name in ('sync_tz', 'max_rate'):
            if name in specs:
                out[name] = specs[name]
        if 'follow_vm' in specs:
            v = specs['follow_vm'].lower()
            if v not in ('true', 'false', '<is> true', '<is> false'):
                raise exception.InvalidVolumeType(
                    reason=_('ukai:follow_vm=%r: use true or false') % specs['follow_vm'])
            out['follow_vm'] = v.endswith('true')
        if out['min_copies'] > out['replicas']:
            raise exception.InvalidVolumeType(
                reason=_('ukai:min_copies %(m)d is more than the %(r)d replicas') %
                {'m': out['min_copies'], 'r': out['replicas']})
        return out

    def _create(self, volume, source=None):
        """Create the image of volume (from source, a snapshot or volume
        name), then give it the type's placement and sync policy. An image
        whose policy cannot be set is deleted again."""
        specs = self._specs(volume)
        qos = self._qos_limits(volume.get('volume_type_id'))
        locations = specs['locations']
        min_copies = specs['min_copies']
        if min_copies > max(1, len(locations)):
            # ukai checks min copies against the copies an image has; it
            # cannot start with fewer and raise it later.
            raise exception.InvalidVolumeType(
                reason=_('ukai:min_copies %(m)d needs ukai:locations naming at least %(m)d nodes') %
                {'m': min_copies})
        if source and not locations and 'min_copies' not in specs['given']:
            min_copies = None  # ukai takes the source's
        self._call(self.client.create_image, volume.name, volume.size * units.Gi,
                   locations=locations or None, min_copies=min_copies,
                   block_size=specs.get('block_size'), source=source,
                   timeout=self.configuration.ukai_copy_timeout,
                   busy=(exception.VolumeBackendAPIException, {}),
                   not_found=(exception.VolumeBackendAPIException, {}))
        try:
            # The replica count is always recorded: the planner keeps it,
            # and a relocation (follow the VM) drops a copy to meet it.
            self._call(self.client.set_policy, volume.name, replicas=specs['replicas'])
            if specs.get('sync_window') or specs.get('max_rate') or specs.get('sync_tz'):
                self._call(self.client.set_sync_policy, volume.name,
                           windows=specs.get('sync_window'),
                           max_rate=specs.get('max_rate'), tz=specs.get('sync_tz'))
            self._set_locality(volume.name, specs['follow_vm'])
            self._set_qos(volume.name, qos)
        except Exception:
            LOG.error('Could not set the ukai policy of %s: deleting it',
                      volume.name)
            try:
                self.client.delete_image(volume.name, now=True)
            except ukai_client.UkaiError as e:
                LOG.error('Could not delete %(v)s: %(e)s', {'v': volume.name, 'e': e})
            raise
        LOG.info('Created ukai image %(v)s (%(s)d GiB, from %(src)s)',
                 {'v': volume.name, 's': volume.size, 'src': source or 'nothing'})

    # QoS.
    @staticmethod
    def _qos_limits(type_id):
        """The ukai limits of a volume type's back-end QoS specs ({}
        without any), checked: an unknown key or a value that is not a
        whole number is refused, never dropped."""
        if not type_id:
            return {}
        qos = (volume_types.get_volume_type_qos_specs(type_id) or {}).get('qos_specs')
        if not qos or qos.get('consumer') not in QOS_CONSUMERS:
            return {}
        specs = dict(qos.get('specs') or {})
        known = set(QOS_LIMITS)
        known.update(k + '_max' for k in QOS_LIMITS)
        known.update(k + '_max_length' for k in QOS_LIMITS)
        values = {}
        for key, value in specs.items():
            if key not in known:
                raise exception.InvalidVolumeType(
                    reason=_('QoS spec %(k)s: ukai limits only %(all)s (with _max and _max_length)') %
                    {'k': key, 'all': ', '.join(sorted(QOS_LIMITS))})
            try:
                values[key] = int(str(value).strip())
            except ValueError:
                raise exception.InvalidVolumeType(
                    reason=_('QoS spec %(k)s=%(v)r is not a whole number') % {'k': key, 'v': value})
            if values[key] < 0:
                raise exception.InvalidVolumeType(
                    reason=_('QoS spec %(k)s=%(v)r is negative') % {'k': key, 'v': value})
        limits = {}
        for key, (limit, burst) in QOS_LIMITS.items():
            if values.get(key):
                limits[limit] = values[key]
            peak = values.get(key + '_max')
            if peak:
                if not values.get(key):
                    raise exception.InvalidVolumeType(
                        reason=_('QoS spec %(k)s_max without %(k)s') % {'k': key})
                limits[burst] = max(peak, values[key]) * (values.get(key + '_max_length') or 1)
        return limits

    def _set_qos(self, name, limits, clear=False):
        if limits or clear:
            self._call(self.client.set_qos, name, clear=clear, **limits)

    def retype(self, context, volume, new_type, diff, host):
        """Retype in place when only the QoS specs change (the image's
        limits follow the new type at once, on the session as it is);
        anything else ukai:-related is left to Cinder's migration."""
        for key, values in ((diff or {}).get('extra_specs') or {}).items():
            if key.startswith(SPEC_PREFIX) and values[0] != values[1]:
                return False, None
        self._set_qos(volume.name, self._qos_limits(new_type and new_type.get('id')), clear=True)
        LOG.info('Retyped %(v)s in place: its QoS limits follow %(t)s',
                 {'v': volume.name, 't': new_type and new_type.get('name')})
        return True, None

    # Volumes.
    def create_volume(self, volume):
        self._create(volume)

    def create_volume_from_snapshot(self, volume, snapshot):
        self._create(volume, source='%s@%s' % (snapshot.volume_name, snapshot.name))

    def create_cloned_volume(self, volume, src_vref):
        self._create(volume, source=src_vref.name)

    def delete_volume(self, volume):
        try:
            self.client.delete_image(volume.name, now=not self.configuration.ukai_deferred_deletion)
        except ukai_client.UkaiError as e:
            if e.status == 404:
                LOG.info('Volume %s is not in ukai: already deleted', volume.name)
                return
            LOG.error('ukai did not delete %(v)s: %(e)s', {'v': volume.name, 'e': e})
            raise self._mapped(e, busy=(exception.VolumeIsBusy, {'volume_name': volume.name}))

    def extend_volume(self, volume, new_size):
        self._call(self.client.resize, volume.name, new_size * units.Gi,
                   not_found=(exception.VolumeNotFound, {'volume_id': volume.id}))

    # Snapshots.
    def create_snapshot(self, snapshot):
        self._call(self.client.create_snapshot, snapshot.volume_name, snapshot.name,
                   not_found=(exception.VolumeNotFound, {'volume_id': snapshot.volume_id}))

    def delete_snapshot(self, snapshot):
        try:
            self.client.delete_snapshot(snapshot.volume_name, snapshot.name)
        except ukai_client.UkaiError as e:
            if e.status == 404:
                LOG.info('Snapshot %s is not in ukai: already deleted', snapshot.name)
                return
            LOG.error('ukai did not delete snapshot %(s)s: %(e)s', {'s': snapshot.name, 'e': e})
            raise self._mapped(e, busy=(exception.SnapshotIsBusy, {'snapshot_name': snapshot.name}))

    def revert_to_snapshot(self, context, volume, snapshot):
        """Revert the image to its snapshot in place: ukai writes back only
        the blocks changed since, on every copy, while the image's I/O
        waits; the part of a volume extended since reads as zeros."""
        self._call(self.client.revert_snapshot, volume.name, snapshot.name,
                   timeout=self.configuration.ukai_copy_timeout,
                   not_found=(exception.SnapshotNotFound, {'snapshot_id': snapshot.id}))
        LOG.info('Reverted ukai image %(v)s to %(v)s@%(s)s', {'v': volume.name, 's': snapshot.name})

    # Exports and connections.
    def create_export(self, context, volume, connector):
        """Per-volume CHAP credentials, made once and kept by Cinder."""
        if not self.configuration.ukai_chap or volume.get('provider_auth'):
            return None
        user = 'ukai-' + secrets.token_hex(6)
        secret = secrets.token_hex(CHAP_SECRET_BYTES)
        return {'provider_auth': 'CHAP %s %s' % (user, secret)}

    def ensure_export(self, context, volume):
        return None

    def remove_export(self, context, volume):
        return None

    def _chap(self, volume):
        auth = volume.get('provider_auth')
        if not self.configuration.ukai_chap:
            return None, None
        if not auth:
            raise exception.VolumeBackendAPIException(
                data=_('volume %s has no CHAP credentials (create_export did not run)') % volume.name)
        method, user, secret = auth.split(None, 2)
        if method != 'CHAP':
            raise exception.VolumeBackendAPIException(
                data=_('volume %(v)s: unknown auth method %(m)s') % {'v': volume.name, 'm': method})
        return user, secret

    def _node_for(self, host, locations):
        """The live ukai node on the connector's host; else a live node
        holding a copy; else any live node."""
        nodes = [n for n in self._call(self.client.nodes) if n.get('state') == 'alive']
        if not nodes:
            raise exception.VolumeBackendAPIException(data=_('ukai: no live node'))
        label = self.configuration.ukai_host_label
        if host:
            short = host.split('.')[0]
            for n in nodes:
                if (n.get('labels') or {}).get(label) in (host, short):
                    return n, True
            for n in nodes:
                if n['name'] in (host, short):
                    return n, True
        for n in nodes:
            if n['name'] in locations:
                return n, False
        return nodes[0], False

    def _set_locality(self, name, follow):
        """Follow the VM (or not) through the image's locality policy. Not
        fatal: a ukai node older than the policy refuses the field (during
        a rolling upgrade), and the volume works without it."""
        try:
            self.client.set_policy(name, locality='best-effort' if follow else 'off')
        except ukai_client.UkaiError as e:
            LOG.warning('Could not set the locality of %(v)s: %(e)s', {'v': name, 'e': e})

    def initialize_connection(self, volume, connector):
        initiator = (connector or {}).get('initiator')
        if not initiator:
            raise exception.InvalidConnectorException(missing='initiator')
        img = self._call(self.client.image, volume.name,
                         not_found=(exception.VolumeNotFound, {'volume_id': volume.id}))
        locations = [loc['node'] for loc in img.get('locations') or []]
        node, on_host = self._node_for(connector.get('host'), locations)
        specs = self._specs(volume)
        if on_host:
            # The hypervisor's node owns the image while the VM runs there
            # (before a live migration's switchover, too); without a copy it
            # serves from the others, and the locality policy (follow the
            # VM, set at create and here for older volumes) brings a copy.
            if specs['follow_vm'] and node['name'] not in locations:
                self._set_locality(volume.name, True)
            try:
                self.client.attach(volume.name, node['name'])
            except ukai_client.UkaiError as e:
                # Ownership still follows the sessions: not fatal.
                LOG.warning('Could not attach %(v)s to %(n)s: %(e)s',
                            {'v': volume.name, 'n': node['name'], 'e': e})
        portal = node.get('iscsi_addr') or ''
        host = portal.rsplit(':', 1)[0].strip('[]')
        if host in ('', '0.0.0.0', '::'):
            raise exception.VolumeBackendAPIException(
                data=_('ukai node %(n)s listens for iSCSI on %(p)s, which no initiator can '
                       'reach: set iscsi.listen to the address hypervisors use') %
                {'n': node['name'], 'p': portal or 'nothing'})
        user, secret = self._chap(volume)
        self._call(self.client.export, volume.name, initiator, chap_user=user, chap_secret=secret)
        data = {
            'target_discovered': False,
            'target_portal': node['iscsi_addr'],
            'target_iqn': img['iqn'],
            'target_lun': 0,
            'volume_id': volume.id,
            'discard': True,
            'encrypted': bool(volume.get('encryption_key_id')),
        }
        if user:
            data.update(auth_method='CHAP', auth_username=user, auth_password=secret)
        LOG.info('Exported %(v)s to %(i)s through %(n)s',
                 {'v': volume.name, 'i': initiator, 'n': node['name']})
        return {'driver_volume_type': 'iscsi', 'data': data}

    def terminate_connection(self, volume, connector, **kwargs):
        if connector is None or not connector.get('initiator'):
            # Force detach: nobody keeps access.
            try:
                img = self.client.image(volume.name)
            except ukai_client.UkaiError as e:
                if e.status == 404:
                    return
                raise exception.VolumeBackendAPIException(data=str(e))
            initiators = [e['initiator'] for e in img.get('exports') or []]
            if img.get('attached'):
                try:
                    self.client.detach(volume.name)
                except ukai_client.UkaiError as e:
                    if e.status != 404:
                        raise exception.VolumeBackendAPIException(data=str(e))
        else:
            initiators = [connector['initiator']]
            # The VM left this host: the image stays attached only to a
            # node it still runs on (a live migration attached it there).
            node, on_host = self._node_for(connector.get('host'), [])
            if on_host:
                try:
                    img = self.client.image(volume.name)
                    if img.get('attached') == node['name']:
                        self.client.detach(volume.name)
                except ukai_client.UkaiError as e:
                    if e.status != 404:
                        LOG.warning('Could not detach %(v)s: %(e)s', {'v': volume.name, 'e': e})
        for ini in initiators:
            try:
                self.client.unexport(volume.name, ini)
            except ukai_client.UkaiError as e:
                if e.status != 404:
                    raise exception.VolumeBackendAPIException(data=str(e))

    # Image transfer: streamed through the ukai API (no local attach).
    def copy_image_to_volume(self, context, volume, image_service, image_id):
        with image_utils.temporary_file(prefix='ukai-image-') as tmp:
            image_utils.fetch_to_raw(context, image_service, image_id, tmp,
                                     self.configuration.volume_dd_blocksize,
                                     size=volume.size, run_as_root=False)
            with open(tmp, 'rb') as f:
                self._call(self.client.write_data, volume.name, f,
                           timeout=self.configuration.ukai_copy_timeout,
                           not_found=(exception.VolumeNotFound, {'volume_id': volume.id}))

    def copy_volume_to_image(self, context, volume, image_service, image_meta):
        with image_utils.temporary_file(prefix='ukai-volume-') as tmp:
            with open(tmp, 'wb') as f:
                self._call(self.client.read_data, volume.name, f,
                           timeout=self.configuration.ukai_copy_timeout,
                           not_found=(exception.VolumeNotFound, {'volume_id': volume.id}))
            volume_utils.upload_volume(context, image_service, image_meta, tmp,
                                       volume, run_as_root=False)

    # Stats.
    def get_volume_stats(self, refresh=False):
        if refresh or not self._stats:
            try:
                self._update_volume_stats()
            except exception.CinderException as e:
                # The scheduler goes on with what it knew (nothing at
                # first: no capacity), the service keeps running.
                LOG.warning('Cannot read ukai capacity: %s', e)
                if not self._stats:
                    self._stats = self._empty_stats()
        return self._stats

    def _empty_stats(self):
        return {
            'volume_backend_name': self.configuration.safe_get('volume_backend_name') or 'ukai',
            'vendor_name': 'ukai', 'driver_version': self.VERSION,
            'storage_protocol': constants.ISCSI, 'total_capacity_gb': 0,
            'free_capacity_gb': 0, 'provisioned_capacity_gb': 0,
            'reserved_percentage': 0, 'thin_provisioning_support': True,
            'thick_provisioning_support': False, 'multiattach': False,
            'QoS_support': True, 'online_extend_support': True,
        }

    def _update_volume_stats(self):
        """Capacity as Cinder should see it: the raw space of the live
        nodes divided by the default replica count (each volume stores
        that many copies); provisioned is the volumes' logical size."""
        nodes = self._call(self.client.nodes)
        images = self._call(self.client.images)
        replicas = max(1, self.configuration.ukai_default_replicas)
        raw_total = sum(n.get('capacity_bytes', 0) for n in nodes if n.get('state') == 'alive')
        raw_free = sum(n.get('free_bytes', 0) for n in nodes if n.get('state') == 'alive')
        provisioned = sum(i['size'] for i in images if not i.get('snapshot_of'))
        backend = self.configuration.safe_get('volume_backend_name') or 'ukai'
        self._stats = {
            'volume_backend_name': backend,
            'vendor_name': 'ukai',
            'driver_version': self.VERSION,
            'storage_protocol': constants.ISCSI,
            'total_capacity_gb': _gib(raw_total / replicas),
            'free_capacity_gb': _gib(raw_free / replicas),
            'provisioned_capacity_gb': _gib(provisioned),
            'reserved_percentage': self.configuration.safe_get('reserved_percentage') or 0,
            'max_over_subscription_ratio': self.configuration.safe_get('max_over_subscription_ratio') or 20.0,
            'thin_provisioning_support': True,
            'thick_provisioning_support': False,
            'multiattach': False,
            'QoS_support': True,
            'online_extend_support': True,
            'location_info': 'ukai:%s' % ','.join(self.client.addresses),
        }
