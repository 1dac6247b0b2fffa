//! `map_chain` keeps runs of different host files apart (`BlockDevice::map_file`), and
//! reports the file of the deciding layer.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, DeviceInfo, Extent, ExtentKind, Result, check_range, map_chain,
};

/// 16 KiB in four 4 KiB pieces: data at host offsets 0, 4096, 8192, 12288, the first
/// two in file 1, the third in file 2, the last unallocated.
#[derive(Debug)]
struct TwoFiles;

impl BlockDevice for TwoFiles {
    fn info(&self) -> DeviceInfo {
        DeviceInfo::new("test", 16384)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, 16384)?;
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        check_range(off, len, 16384)?;
        let kind = if off >= 12288 {
            ExtentKind::Unallocated { offset: None }
        } else {
            ExtentKind::Data { offset: Some(off) }
        };
        Ok(Extent {
            offset: off,
            len: (4096 - off % 4096).min(len),
            kind,
        })
    }
    fn host_files(&self) -> Vec<String> {
        vec!["a.bin".into(), "b.bin".into()]
    }
    fn map_file(&self, off: u64) -> usize {
        if off < 8192 { 1 } else { 2 }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn runs_of_different_files_do_not_merge() {
    let dev: Arc<dyn BlockDevice> = Arc::new(TwoFiles);
    let m = map_chain(dev.as_ref(), 0, 16384).unwrap();
    let got: Vec<(u64, u64, usize)> = m.iter().map(|e| (e.start, e.length, e.file)).collect();
    assert_eq!(got, vec![(0, 8192, 1), (8192, 4096, 2), (12288, 4096, 0)]);
    assert_eq!(dev.host_files()[m[1].file - 1], "b.bin");
}
