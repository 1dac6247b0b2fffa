//! VMDK cases: qemu-iotests 059's header corruptions (capacity, grain size, grain table
//! size, grain directory), tables aimed at the descriptor and header, stream markers,
//! CVE-2022-47951 descriptors (also hidden in a zero-capacity sparse header), extent and
//! parent loops, thousands of extents.

use super::{Builder, Poke};

/// Sparse header fields (VMware "Virtual Disk Format 5.0").
const CAPACITY: usize = 12;
const GRAIN: usize = 20;
const DESC_OFF: usize = 28;
const DESC_SIZE: usize = 36;
const GTES: usize = 44;
const RGD: usize = 48;
const GD: usize = 56;

pub(super) fn cases(b: &mut Builder) {
    let base = b.qemu("v", "vmdk", "", "64M");
    let len = base.len() as u64;
    let gd = base.le64_at(GD) as usize * 512;
    let gt = base.le32_at(gd) as usize * 512;
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.clone();
        f(&mut v);
        v
    };
    let list: [(&str, &'static str, Vec<u8>); 12] = [
        (
            "v-capacity-huge",
            "2^40 sectors in 1-sector grains (an 8 GiB grain directory)",
            edit(&|v| {
                v.le64(CAPACITY, 1 << 40);
                v.le64(GRAIN, 1);
            }),
        ),
        ("v-grain-zero", "grain size 0", edit(&|v| v.le64(GRAIN, 0))),
        (
            "v-grain-huge",
            "grain size 2^40 sectors",
            edit(&|v| v.le64(GRAIN, 1 << 40)),
        ),
        (
            "v-gtes-zero",
            "0 entries per grain table",
            edit(&|v| v.le32(GTES, 0)),
        ),
        (
            "v-gtes-huge",
            "2^32-1 entries per grain table",
            edit(&|v| v.le32(GTES, u32::MAX)),
        ),
        (
            "v-gd-eof",
            "grain directories past the end",
            edit(&|v| {
                v.le64(GD, len);
                v.le64(RGD, len);
            }),
        ),
        (
            "v-gd-header",
            "grain directories on the header",
            edit(&|v| {
                v.le64(GD, 0);
                v.le64(RGD, 0);
            }),
        ),
        (
            "v-gt-desc",
            "grain table aimed at the descriptor",
            edit(&|v| v.le32(gd, 1)),
        ),
        (
            "v-grain-header",
            "grain aimed at the header",
            edit(&|v| v.le32(gt, 1)),
        ),
        (
            "v-grain-eof",
            "grain past the end",
            edit(&|v| v.le32(gt, u32::MAX - 7)),
        ),
        (
            "v-desc-huge",
            "descriptor of 2^40 sectors",
            edit(&|v| v.le64(DESC_SIZE, 1 << 40)),
        ),
        (
            "v-zero-capacity-desc",
            "CVE-2022-47951 hidden: a zero-capacity sparse header whose descriptor names /etc/passwd",
            edit(&|v| {
                v.le64(CAPACITY, 0);
                let off = v.le64_at(DESC_OFF) as usize * 512;
                let text = b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/passwd\" 0\n";
                v[off..off + 512].fill(0);
                v[off..off + text.len()].copy_from_slice(text);
            }),
        ),
    ];
    for (name, what, bytes) in list {
        b.add(name, "vmdk", what, true, &bytes);
    }
    text_cases(b);
}

fn text_cases(b: &mut Builder) {
    let head = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n";
    let flat = |t: &str, extents: &str| format!("{head}createType=\"{t}\"\n{extents}");
    b.add(
        "v-flat-passwd",
        "vmdk",
        "CVE-2022-47951: a FLAT extent naming /etc/passwd",
        true,
        flat("monolithicFlat", "RW 2048 FLAT \"/etc/passwd\" 0\n").as_bytes(),
    );
    let many: String = (0..5000)
        .map(|i| format!("RW 1 FLAT \"x{i}\" 0\n"))
        .collect();
    b.add(
        "v-extents-many",
        "vmdk",
        "5000 extents",
        true,
        flat("monolithicFlat", &many).as_bytes(),
    );
    b.add(
        "v-extent-self",
        "vmdk",
        "a descriptor naming itself as its sparse extent",
        true,
        flat(
            "twoGbMaxExtentSparse",
            "RW 2048 SPARSE \"v-extent-self.img\"\n",
        )
        .as_bytes(),
    );
    b.add(
        "v-zero-huge",
        "vmdk",
        "a ZERO extent of 2^62 sectors",
        true,
        flat("monolithicFlat", "RW 4611686018427387904 ZERO\n").as_bytes(),
    );
    let mut parent = b.qemu("vp", "vmdk", "", "16M");
    let off = parent.le64_at(DESC_OFF) as usize * 512;
    let text = format!(
        "{head}createType=\"monolithicSparse\"\nparentFileNameHint=\"v-parent-self.img\"\n\
         RW 32768 SPARSE \"v-parent-self.img\"\n"
    )
    .replace("parentCID=ffffffff", "parentCID=fffffffe");
    parent[off..off + 1024].fill(0);
    parent[off..off + text.len()].copy_from_slice(text.as_bytes());
    b.add(
        "v-parent-self",
        "vmdk",
        "a sparse VMDK whose parent is itself (a loop)",
        true,
        &parent,
    );
}
