// Package datadir is this node's copies on disk: one sparse file per
// image (<id>.img) and the image's record cached beside it (<id>.json),
// so the node can serve its images at start while the metadata store is
// unreachable. Both live in the images directory of node.data_dir.
//
// It is the one place a path is built from an image id, and it refuses
// any id that is not 32 lowercase hex digits (meta.ValidateID), whatever
// validated it before: no record, request or cached file can make the
// node create, open or remove a file outside its data dir.
//
// It holds no lock: callers serialize what they do to one image's files
// (the node's reconcile lock, or an image not served).
package datadir

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/target/lun"
)

// Dir is the images directory.
type Dir struct{ path string }

// Open returns the images directory at path, creating it (0700).
func Open(path string) (*Dir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, err
	}
	return &Dir{path: path}, nil
}

// Path is the directory.
func (d *Dir) Path() string { return d.path }

// file is image id's file with extension ext, or meta.ErrInvalid.
func (d *Dir) file(id, ext string) (string, error) {
	if err := meta.ValidateID(id); err != nil {
		return "", err
	}
	return filepath.Join(d.path, id+ext), nil
}

// ImagePath is the data file of image id's copy.
func (d *Dir) ImagePath(id string) (string, error) { return d.file(id, ".img") }

// Open opens image id's copy, of size bytes (0: as it is). A copy that
// does not exist is an error satisfying errors.Is(err, os.ErrNotExist).
func (d *Dir) Open(id string, size int64) (*lun.FileCopy, error) {
	p, err := d.ImagePath(id)
	if err != nil {
		return nil, err
	}
	return lun.OpenFile(p, size)
}

// Create creates image id's copy: size bytes of zeros, sparse.
func (d *Dir) Create(id string, size int64) (*lun.FileCopy, error) {
	p, err := d.ImagePath(id)
	if err != nil {
		return nil, err
	}
	return lun.CreateFile(p, size)
}

// Prepare creates image id's empty copy for a new image; a copy of the
// same size already there is fine (a retried request), one of another
// size is meta.ErrConflict.
func (d *Dir) Prepare(id string, size int64) error {
	p, err := d.ImagePath(id)
	if err != nil {
		return err
	}
	if st, err := os.Stat(p); err == nil {
		if st.Size() != size {
			return fmt.Errorf("%w: a copy of image id %s with another size exists", meta.ErrConflict, id)
		}
		return nil
	}
	f, err := lun.CreateFile(p, size)
	if err != nil {
		return err
	}
	return f.Close()
}

// Grow extends image id's copy, which nothing holds open, to size bytes
// (zeros).
func (d *Dir) Grow(id string, size int64) error {
	c, err := d.Open(id, 0)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Grow(size)
}

// Remove removes image id's copy and cached record; files already gone
// are not an error.
func (d *Dir) Remove(id string) error {
	var errs []error
	for _, ext := range []string{".img", ".json"} {
		p, err := d.file(id, ext)
		if err == nil {
			err = os.Remove(p)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Forget removes image id's cached record and keeps its copy (an image in
// the trash: a restart must not export it again, and the data waits for
// a restore or a purge).
func (d *Dir) Forget(id string) error {
	p, err := d.file(id, ".json")
	if err == nil {
		err = os.Remove(p)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Uncached returns the ids of the copies without a cached record (images
// in the trash, or copies being prepared for a new location).
func (d *Dir) Uncached() []string {
	files, _ := filepath.Glob(filepath.Join(d.path, "*.img"))
	var ids []string
	for _, f := range files {
		id := strings.TrimSuffix(filepath.Base(f), ".img")
		if meta.ValidateID(id) != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(d.path, id+".json")); errors.Is(err, os.ErrNotExist) {
			ids = append(ids, id)
		}
	}
	return ids
}

// CacheRecord stores img's record beside its copy (written to a
// temporary file, then renamed: a crash leaves the old record or the new
// one).
func (d *Dir) CacheRecord(img meta.Image) error {
	p, err := d.file(img.ID, ".json")
	if err != nil {
		return err
	}
	b, err := json.Marshal(img)
	if err != nil {
		return err
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("cache record of %s: %w", img.Name, err)
	}
	return os.Rename(tmp, p)
}

// CachedRecords are the records cached in the directory, each one
// validated; bad says which files were unreadable or invalid (and are
// ignored), with the file's name.
func (d *Dir) CachedRecords() (imgs []meta.Image, bad []error) {
	files, _ := filepath.Glob(filepath.Join(d.path, "*.json"))
	for _, f := range files {
		var img meta.Image
		b, err := os.ReadFile(f)
		if err == nil {
			err = json.Unmarshal(b, &img)
		}
		if err == nil {
			err = img.Validate()
		}
		if err == nil && filepath.Base(f) != img.ID+".json" {
			err = fmt.Errorf("%w: the record is of image id %s", meta.ErrInvalid, img.ID)
		}
		if err != nil {
			bad = append(bad, fmt.Errorf("%s: %w", f, err))
			continue
		}
		imgs = append(imgs, img)
	}
	return imgs, bad
}
