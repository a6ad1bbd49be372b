#!/usr/bin/env python3
"""Generate a small, deterministic Chinese financial-news classification dataset.

Command (run from the repo root; standard library only):

    python3 data/make_sample_news.py

Writes:
  * data/sample_news.csv  - UTF-8 CSV (no BOM), header ``text,label``, rows in shuffled
    order, ``--per-class`` items (default 130) for each of the 8 labels:
    货币政策, 股市, 宏观经济, 公司, 房地产, 国际贸易, 大宗商品, 金融监管.
  * data/sample_test.json - JSON array of held-out ``{"text", "label"}`` items,
    ``--test-per-class`` (default 6) per label; no text also appears in the CSV.

Each text is a topical main sentence built from slot-filled templates (>= 10 per label),
optionally followed by an on-topic follow-up sentence and, with ~30% probability, a
neutral or cross-category distractor clause. Every text is unique across both files.
Output is byte-identical for the same ``--seed``.
"""
import argparse
import csv
import json
import os
import random
import re
import statistics

LABELS = ["货币政策", "股市", "宏观经济", "公司", "房地产", "国际贸易", "大宗商品", "金融监管"]

WORDS = {
    "pboc": ["中国人民银行", "央行", "人民银行"],
    "fcb": ["欧洲央行", "英国央行", "日本央行", "加拿大央行", "澳洲联储"],
    "city": ["北京", "上海", "深圳", "广州", "杭州", "成都", "武汉", "南京", "重庆", "西安", "苏州", "天津", "郑州", "长沙"],
    "port": ["上海", "宁波舟山", "深圳", "青岛", "广州", "天津", "厦门"],
    "bank": ["工商银行", "建设银行", "招商银行", "农业银行", "中国银行", "交通银行", "兴业银行", "平安银行", "浦发银行"],
    "company": ["比亚迪", "宁德时代", "腾讯控股", "阿里巴巴", "贵州茅台", "美的集团", "小米集团", "京东方",
                "中芯国际", "隆基绿能", "海尔智家", "立讯精密", "格力电器", "迈瑞医疗", "恒瑞医药", "紫光股份"],
    "automaker": ["比亚迪", "理想汽车", "蔚来", "小鹏汽车", "吉利汽车", "长城汽车", "零跑汽车"],
    "developer": ["万科", "保利发展", "招商蛇口", "华润置地", "龙湖集团", "绿城中国", "中海地产", "金地集团"],
    "index": ["上证指数", "深证成指", "创业板指", "沪深300", "科创50", "北证50"],
    "sector": ["半导体", "新能源汽车", "白酒", "医药", "券商", "银行", "光伏", "人工智能", "军工", "消费电子", "机器人"],
    "country": ["美国", "欧盟", "日本", "韩国", "东盟", "巴西", "澳大利亚", "俄罗斯", "印度", "墨西哥", "越南", "加拿大"],
    "eu_country": ["德国", "波兰", "西班牙", "匈牙利", "意大利", "荷兰"],
    "good": ["钢铁", "铝制品", "电动汽车", "光伏组件", "锂电池", "化工品", "农产品", "芯片", "家电", "纺织品"],
    "agri": ["大豆", "玉米", "棉花", "白糖", "豆粕", "生猪", "菜籽油"],
    "sfe": ["螺纹钢", "热轧卷板", "沪铜", "沪铝", "沪锌", "天然橡胶", "沪银"],
    "reg": ["国家金融监督管理总局", "中国证监会", "金融监管总局", "中国人民银行", "国家外汇管理局", "地方金融管理局"],
    "biz": ["互联网贷款", "理财产品销售", "信托", "私募基金", "消费金融", "融资担保", "保险代理", "跨境支付"],
    "rule": ["商业银行资本管理办法", "金融机构合规管理办法", "小额贷款公司监督管理暂行办法",
             "保险资产管理公司管理规定", "私募投资基金监督管理办法", "银行保险机构数据安全管理办法"],
    "risk": ["中小金融机构", "地方债务", "房地产领域", "非法金融活动", "跨境资本流动"],
    "violation": ["内幕交易", "操纵市场", "财务造假", "违规减持", "欺诈发行"],
    "field": ["人工智能", "自动驾驶", "储能", "智能家居", "创新药", "芯片设计", "机器人"],
    "product": ["智能手机", "动力电池", "新能源汽车", "储能系统", "智能家电", "服务器", "光伏组件"],
    "period": ["第一季度", "上半年", "前三季度", "年度"],
    "quarter": ["第一季度", "上半年", "前三季度", "全年"],
    "name": ["王建国", "李明", "张伟", "陈晓东", "刘洋", "赵立新", "周海涛", "孙志强"],
    "updown": ["上升", "下降"],
    "fedmove": ["下调", "上调"],
}

METALS = {"铜": (8500, 10500), "铝": (2200, 2700), "锌": (2500, 3100), "镍": (15000, 18500)}


def num(r, lo, hi, nd=1):
    """Random number in [lo, hi] with nd decimals (nd=0 -> integer string)."""
    return str(r.randint(lo, hi)) if nd == 0 else f"{r.uniform(lo, hi):.{nd}f}"


NUMS = {
    "month": lambda r: f"{r.randint(1, 12)}月",
    "m2plus": lambda r: str(r.randint(2, 11)),
    "date": lambda r: f"{r.randint(1, 12)}月{r.randint(1, 28)}日",
    "year": lambda r: str(r.randint(2025, 2028)),
    "n": lambda r: num(r, 2, 11, 0), "nth": lambda r: "一二三四"[r.randint(0, 3)],
    "bp": lambda r: r.choice(["10", "15", "20", "25", "50"]),
    "rrr": lambda r: r.choice(["0.25", "0.5"]),
    "pct": lambda r: num(r, 0.1, 3.9, 2 if r.random() < 0.3 else 1), "pct2": lambda r: num(r, 0.2, 4.5),
    "bigpct": lambda r: num(r, 5, 60), "bigpct2": lambda r: num(r, 61, 90), "smallpct": lambda r: num(r, 1, 12),
    "gdp": lambda r: num(r, 4.2, 6.1), "cpi": lambda r: num(r, 0.1, 2.5), "ppi": lambda r: num(r, 0.5, 3.5),
    "pmi": lambda r: num(r, 48.5, 51.8), "small": lambda r: num(r, 0.1, 0.9), "unemp": lambda r: num(r, 4.9, 5.5),
    "m2": lambda r: num(r, 6.5, 9.9), "m1": lambda r: num(r, 0.5, 6.0), "bond": lambda r: num(r, 1.6, 2.3, 2),
    "repo": lambda r: r.choice(["1.40", "1.50", "1.70", "1.80"]),
    "lpr1": lambda r: r.choice(["3.00", "3.10", "3.35", "3.45"]), "lpr5": lambda r: r.choice(["3.50", "3.60", "3.85", "3.95"]),
    "trillion": lambda r: num(r, 0.5, 1.2), "turnover": lambda r: num(r, 0.8, 2.6, 2),
    "wanyi_tr": lambda r: num(r, 3.2, 4.1, 2), "wanyi_int": lambda r: num(r, 8.0, 18.0, 2),
    "yi1": lambda r: num(r, 20, 950, 0), "yi2": lambda r: num(r, 1000, 9000, 0), "yi3": lambda r: num(r, 100, 3000, 0),
    "yi_big": lambda r: num(r, 120, 8800, 1), "usd": lambda r: num(r, 600, 1100, 1), "wan": lambda r: num(r, 50, 3000, 0),
    "points": lambda r: num(r, 3000, 3900, 0), "k": lambda r: num(r, 12, 4200, 0), "k70": lambda r: num(r, 20, 65, 0),
    "deliv": lambda r: f"{r.randint(12000, 390000)}", "yuan": lambda r: r.choice(["1999", "3499", "4999", "12999", "159800"]),
    "stake": lambda r: num(r, 10, 100, 0), "down": lambda r: r.choice(["15", "20", "25"]), "area": lambda r: num(r, 20, 320),
    "deal": lambda r: num(r, 1500, 18000, 0), "gjj": lambda r: r.choice(["80", "100", "120", "150", "160"]),
    "tariff": lambda r: r.choice(["10", "15", "25", "35", "50", "100"]), "teu": lambda r: num(r, 180, 520),
    "trains": lambda r: num(r, 1300, 1900, 0), "oil": lambda r: num(r, 58, 92, 2), "gold": lambda r: num(r, 2400, 4300, 0),
    "silver": lambda r: num(r, 26, 52, 2), "ore": lambda r: num(r, 680, 980, 0), "kbd": lambda r: num(r, 13, 55, 0),
    "p1": lambda r: num(r, 55, 320, 0), "p2": lambda r: num(r, 55, 310, 0),
    "metal_px": lambda r: (lambda m: f"{m}价格上涨{num(r, 0.3, 3.5)}%，报每吨{num(r, *METALS[m], 0)}美元")(r.choice(sorted(METALS))),
}

TEMPLATES = {
    "货币政策": [
        "{pboc}宣布下调金融机构存款准备金率{rrr}个百分点，预计释放长期资金约{trillion}万亿元。",
        "{date}，{pboc}开展{yi1}亿元7天期逆回购操作，中标利率为{repo}%，与此前持平。",
        "{month}贷款市场报价利率出炉，1年期LPR为{lpr1}%，5年期以上LPR为{lpr5}%。",
        "美联储宣布将联邦基金利率目标区间{fedmove}{bp}个基点，符合市场此前预期。",
        "{fcb}宣布将基准利率下调{bp}个基点，为年内第{nth}次降息。",
        "{pboc}本月开展{yi2}亿元中期借贷便利操作，实现净投放{yi3}亿元，保持流动性合理充裕。",
        "{pboc}货币政策委员会召开季度例会，强调实施适度宽松的货币政策，加大逆周期调节力度。",
        "{pboc}数据显示，{month}末广义货币M2余额同比增长{m2}%，狭义货币M1同比增长{m1}%。",
        "{pboc}表示，将综合运用降准、降息等多种货币政策工具，引导银行降低综合融资成本。",
        "{pboc}宣布下调再贷款利率{bp}个基点，并增加科技创新再贷款额度{yi2}亿元。",
        "{fcb}行长在议息会议后表示，将根据通胀数据决定下一步利率路径。",
        "{pboc}宣布降准{rrr}个百分点，{date}起实施。",
    ],
    "股市": [
        "{date}，A股三大指数集体收涨，{index}上涨{pct}%，两市成交额突破{turnover}万亿元。",
        "{date}，A股三大指数集体收跌，{index}下跌{pct}%，两市成交额{turnover}万亿元。",
        "{index}早盘低开高走，午后{sector}板块拉升，收盘上涨{pct}%。",
        "{sector}板块今日领跌，{company}股价盘中一度跌停，全天成交{yi1}亿元。",
        "北向资金全天净买入{yi1}亿元，主要流向{sector}和{sector2}板块。",
        "两市融资余额升至{turnover}万亿元，创近{n}个月新高，投资者风险偏好有所回升。",
        "本月共有{n}家企业在科创板和创业板首发上市，新股上市首日平均涨幅达{bigpct}%。",
        "沪深两市超过{k}只个股上涨，{sector}概念股掀起涨停潮，上证指数站上{points}点。",
        "{index}本周累计下跌{pct}%，{sector}板块主力资金净流出超{yi1}亿元，市场观望情绪浓厚。",
        "港股{date}收盘，恒生指数跌{pct}%，恒生科技指数跌{pct2}%，南向资金净买入{yi1}亿港元。",
        "股票型公募基金{month}新发规模达{yi2}亿元，增量资金入市推动A股交投活跃。",
        "{index}{date}收涨{pct}%，{sector}股领涨。",
    ],
    "宏观经济": [
        "国家统计局{date}发布数据，{quarter}国内生产总值同比增长{gdp}%，经济运行总体平稳。",
        "{month}全国居民消费价格指数同比上涨{cpi}%，工业生产者出厂价格指数同比下降{ppi}%。",
        "{month}制造业采购经理指数为{pmi}%，比上月{updown}{small}个百分点。",
        "{month}社会消费品零售总额同比增长{smallpct}%，其中餐饮收入和服务消费增长较快。",
        "1-{m2plus}月全国固定资产投资同比增长{pct}%，基础设施投资和制造业投资保持较快增长。",
        "{month}全国城镇调查失业率为{unemp}%，与上月持平，就业形势总体稳定。",
        "国家发展改革委表示，将加力推进超长期特别国债项目建设，扩大有效投资，提振居民消费。",
        "{month}规模以上工业增加值同比增长{gdp}%，高技术制造业增加值增速明显快于整体。",
        "{city}发布上半年经济数据，地区生产总值同比增长{gdp}%，增速高于全国平均水平。",
        "财政部数据显示，前{n}个月全国一般公共预算收入{wanyi_int}万亿元，同比增长{pct}%。",
        "国际货币基金组织将{country}今年经济增长预期调整至{gdp}%，理由是内需持续改善。",
        "{month}CPI同比上涨{cpi}%，PPI降幅收窄。",
    ],
    "公司": [
        "{company}发布{period}财报，实现营业收入{yi_big}亿元，同比增长{bigpct}%，净利润{yi1}亿元。",
        "{company}公告称，拟以不超过{yi1}亿元回购公司股份，用于实施员工持股计划。",
        "{company}宣布与{company2}达成战略合作，双方将在{field}领域开展联合研发。",
        "{company}{date}召开新品发布会，推出新一代{product}，售价{yuan}元起。",
        "{company}董事会审议通过议案，聘任{name}为公司总裁，任期三年。",
        "{company}拟投资{yi1}亿元在{city}建设{product}生产基地，预计{year}年建成投产。",
        "{company}公告称，拟以{yi1}亿元收购{company2}旗下子公司{stake}%股权。",
        "{company}发布业绩预告，预计上半年净利润同比下降{bigpct}%至{bigpct2}%，主要受原材料成本上升影响。",
        "{company}宣布启动组织架构调整，精简{k}个岗位，以聚焦核心业务、提升经营效率。",
        "{automaker}{month}交付新车{deliv}辆，同比增长{bigpct}%，海外市场销量占比持续提升。",
        "{company}{period}净利润同比增长{bigpct}%。",
    ],
    "房地产": [
        "{city}出台楼市新政，取消普通住宅和非普通住宅标准，首套房首付比例降至{down}%。",
        "国家统计局数据显示，{month}70个大中城市中有{k70}个城市新建商品住宅价格环比下降。",
        "{developer}{month}实现合同销售金额{yi1}亿元，同比下降{bigpct}%，销售面积{area}万平方米。",
        "{city}{month}新建商品房成交{deal}套，环比增长{bigpct}%，二手房成交量同步回升。",
        "{city}住房公积金管理中心宣布，公积金贷款最高额度提高至{gjj}万元，支持刚性住房需求。",
        "1-{m2plus}月全国房地产开发投资同比下降{smallpct}%，新建商品房销售面积同比下降{pct}%。",
        "{city}土地市场迎来成交高峰，{developer}以{yi1}亿元竞得一宗住宅用地，溢价率{bigpct}%。",
        "{developer}公告称，境外债务重组方案获得债权人支持，公司将持续推进保交楼工作。",
        "{city}加快推进城中村改造，计划年内筹集保障性租赁住房{deal}套。",
        "{city}二手房挂牌量持续攀升，部分小区房价较高点回落{bigpct}%，购房者观望情绪较浓。",
        "{city}{month}新房成交{deal}套，环比回升。",
    ],
    "国际贸易": [
        "海关总署数据显示，{month}我国货物贸易进出口总值{wanyi_tr}万亿元，同比增长{pct}%。",
        "{month}我国出口同比增长{smallpct}%，进口同比下降{pct}%，贸易顺差扩大至{usd}亿美元。",
        "{country}宣布对进口自{country2}的{good}加征{tariff}%关税，引发贸易伙伴强烈不满。",
        "中国与{country}签署自由贸易协定升级议定书，双方将在货物贸易和服务贸易领域扩大开放。",
        "商务部新闻发言人表示，中方将依法对原产于{country}的{good}发起反倾销调查。",
        "前{n}个月我国对{country}进出口额同比增长{smallpct}%，{country}继续保持我国主要贸易伙伴地位。",
        "{port}港{month}集装箱吞吐量达{teu}万标准箱，同比增长{pct}%，外贸航线持续加密。",
        "中欧班列{month}开行{trains}列，同比增长{smallpct}%，货物运抵{eu_country}等多个欧洲国家。",
        "{month}我国跨境电商进出口额达{yi_big}亿元，同比增长{bigpct}%，新兴市场订单增长明显。",
        "世界贸易组织下调全球货物贸易增长预期至{pct}%，称关税壁垒上升拖累跨境需求。",
        "{country}与{country2}就关税问题举行新一轮贸易磋商，双方同意暂停部分加征关税措施。",
        "{month}我国出口同比增长{smallpct}%，好于预期。",
    ],
    "大宗商品": [
        "国际油价{date}大幅上涨，布伦特原油期货报每桶{oil}美元，涨幅{pct}%。",
        "国际油价{date}明显回落，纽约原油期货报每桶{oil}美元，跌幅{pct}%。",
        "纽约商品交易所黄金期货价格突破每盎司{gold}美元，创历史新高，避险需求持续升温。",
        "伦敦金属交易所{metal_px}，库存降至近{n}年低位。",
        "大连商品交易所铁矿石主力合约{date}收涨{pct}%，报每吨{ore}元，钢厂补库需求增加。",
        "欧佩克+宣布自{month}起每日增产原油{kbd}万桶，国际油价应声回落。",
        "国内{agri}期货价格连续{n}个交易日走高，主产区天气异常引发供应担忧。",
        "上海期货交易所{sfe}主力合约夜盘下跌{pct}%，下游需求疲弱压制价格。",
        "国家发展改革委宣布，国内汽油、柴油价格每吨分别提高{p1}元和{p2}元。",
        "美国天然气期货价格本周上涨{smallpct}%，寒潮天气推升取暖需求。",
        "国内动力煤价格{month}环比下跌{pct}%，港口库存高企，电厂采购意愿不强。",
        "现货白银报每盎司{silver}美元，跟随黄金走强，年内累计涨幅超过{bigpct}%。",
        "现货黄金{date}大涨{pct}%，站上{gold}美元。",
    ],
    "金融监管": [
        "{reg}发布关于加强{biz}业务监管的通知，要求相关机构在{n}个月内完成整改。",
        "{reg}对{bank}{city}分行开出罚单，罚没合计{wan}万元，涉及贷款资金违规挪用等问题。",
        "中国证监会对{company}{violation}案作出行政处罚，拟罚款{wan}万元，并对相关责任人采取市场禁入措施。",
        "{reg}表示，将严厉打击非法集资和非法金融活动，切实保护金融消费者合法权益。",
        "{reg}就《{rule}（征求意见稿）》向社会公开征求意见。",
        "{reg}召开年度监管工作会议，强调防范化解{risk}风险，坚决做到监管全覆盖。",
        "{reg}通报专项检查情况，共查处违规机构{k70}家，责令{n}家机构暂停新增{biz}业务。",
        "中国证监会修订上市公司信息披露管理办法，强化对{violation}行为的监管和追责。",
        "{reg}要求{bank}等系统重要性银行补充附加资本，并于{year}年前满足总损失吸收能力要求。",
        "{reg}联合多部门开展{biz}领域专项整治行动，已清退不合规机构{k70}家。",
        "{reg}对{bank}开出罚单，罚没{wan}万元。",
    ],
}

FOLLOWUPS = {
    "货币政策": ["分析人士认为，此举有助于降低实体经济融资成本。", "业内预计年内仍有降准降息空间。",
             "当日10年期国债收益率报{bond}%。", "货币市场短期利率整体平稳。"],
    "股市": ["分析人士指出，短期市场或维持震荡格局。", "{sector}、{sector2}等板块涨幅居前。",
           "两市成交额较前一交易日有所放大。", "机构认为增量资金入市将支撑指数中枢上移。"],
    "宏观经济": ["专家表示，稳增长政策效果持续显现。", "国家统计局新闻发言人表示，经济回升向好的基础仍需巩固。",
             "下阶段宏观政策将更加注重扩大内需。", "多家机构据此上调了全年增长预测。"],
    "公司": ["公司表示，相关事项不会对日常经营产生重大影响。", "公司管理层表示，将继续加大研发投入。",
           "公司今年以来已第{nth}次披露重大经营事项。", "公司称将持续优化产品结构和成本控制。"],
    "房地产": ["业内人士认为，楼市止跌回稳仍需政策持续发力。", "中介机构数据显示，门店带看量环比上升{smallpct}%。",
            "新政发布后，多个楼盘售楼处到访量明显增加。", "开发商普遍加快了去库存节奏。"],
    "国际贸易": ["专家认为，我国外贸韧性依然较强。", "机电产品出口占比保持在六成左右。",
             "商务部表示将继续推动贸易投资自由化便利化。", "多家外贸企业反映海外订单有所回暖。"],
    "大宗商品": ["分析师预计短期价格仍将高位震荡。", "期货市场持仓量同步增加。",
             "贸易商表示现货市场成交偏清淡。", "供需格局变化仍是影响价格的主要因素。"],
    "金融监管": ["监管部门表示，将持续保持高压监管态势。", "业内人士认为，此举有利于促进行业规范发展。",
             "相关机构表示已按要求完成整改。", "监管部门强调将坚持“零容忍”原则。"],
}

# Clauses that mention another category's keyword in passing without changing the topic.
CROSS = {
    "货币政策": ["受此影响，房贷利率有望进一步下行。", "当日A股银行板块小幅波动。", "此前公布的CPI数据显示物价仍处低位。"],
    "股市": ["消息面上，央行近期开展了逆回购操作。", "国际油价走弱也对石油板块形成压制。", "部分上市公司当日发布了业绩预告。"],
    "宏观经济": ["同期，房地产投资仍处于调整阶段。", "外需方面，出口增速有所放缓。", "央行此前表示将保持流动性合理充裕。"],
    "公司": ["受消息影响，公司股价盘中一度涨停。", "公司称铜价上涨对毛利率有所影响。", "公司表示当前贷款利率处于低位，融资成本下降。"],
    "房地产": ["近期房贷利率已降至历史低位。", "5年期以上LPR下调也为购房者减轻了月供压力。", "部分房企股价当日应声上涨。"],
    "国际贸易": ["人民币汇率基本稳定也为出口企业提供了支撑。", "铁矿石、原油等大宗商品进口量保持增长。", "部分出口企业股价应声走高。"],
    "大宗商品": ["美元指数走弱对商品价格形成支撑。", "市场同时关注美联储利率决议。", "相关矿业公司股价跟随上涨。"],
    "金融监管": ["被处罚银行表示已完成整改。", "此前部分券商股价出现波动。", "业内认为此举有利于稳定房地产融资秩序。"],
}
NEUTRAL = ["市场人士认为，后续走势仍需观察。", "相关情况有待进一步跟踪。",
           "业内人士表示，将密切关注后续政策变化。", "分析人士提醒投资者注意风险。"]
PREFIXES = ["据新华社报道，", "记者获悉，", "最新消息显示，", "据财联社报道，", "据证券时报报道，"]

SLOT_RE = re.compile(r"\{([a-z_0-9]+)\}")


def fill(template, r):
    """Fill {slot} placeholders; same name -> same value, {slot2} -> a different value."""
    chosen = {}

    def repl(m):
        key = m.group(0)
        if key not in chosen:
            name = m.group(1)
            base = name if (name in NUMS or name in WORDS) else name.rstrip("0123456789")
            gen = NUMS.get(base) or (lambda rr: rr.choice(WORDS[base]))
            used = {v for k, v in chosen.items() if k.rstrip("0123456789}") == "{" + base}
            value = gen(r)
            for _ in range(20):
                if value not in used:
                    break
                value = gen(r)
            chosen[key] = value
        return chosen[key]

    return SLOT_RE.sub(repl, template)


def make_text(label, r):
    """One news item: main sentence, optional follow-up, optional distractor (~30%)."""
    main = fill(r.choice(TEMPLATES[label]), r)
    follow = ""
    if r.random() < 0.5:  # zero, one or two on-topic follow-up sentences
        k = 2 if r.random() < 0.3 else 1
        follow = "".join(fill(t, r) for t in r.sample(FOLLOWUPS[label], k))
    prefix, tail = "", ""
    if r.random() < 0.30:
        kind = r.random()
        if kind < 0.45:
            tail = r.choice(CROSS[label])
        elif kind < 0.8:
            tail = r.choice(NEUTRAL)
        else:
            prefix = r.choice(PREFIXES)
    text = prefix + main + follow + tail
    return text if len(text) <= 120 else prefix + main + tail


def generate(per_class, test_per_class, seed):
    """Return (train_rows, test_rows); every text is unique across both sets."""
    r = random.Random(seed)
    seen, train, test = set(), [], []
    for label in LABELS:
        items = []
        attempts = 0
        while len(items) < per_class + test_per_class:
            attempts += 1
            if attempts > 200 * (per_class + test_per_class) + 1000:
                raise RuntimeError(f"could not generate enough unique texts for {label}")
            text = make_text(label, r)
            if text not in seen:
                seen.add(text)
                items.append({"text": text, "label": label})
        train.extend(items[:per_class])
        test.extend(items[per_class:])
    r.shuffle(train)
    r.shuffle(test)
    return train, test


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        for row in rows:
            writer.writerow([row["text"], row["label"]])


def write_json(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(rows, f, ensure_ascii=False, indent=2)
        f.write("\n")


def summarize(train, test, csv_path, test_path):
    for label in LABELS:
        print(f"  {label}: {sum(1 for x in train if x['label'] == label)}")
    lengths = [len(x["text"]) for x in train + test]
    print(f"CSV rows: {len(train)}  test items: {len(test)}")
    print(f"text length (chars): min={min(lengths)} median={statistics.median(lengths)} max={max(lengths)}")
    print(f"wrote {csv_path}\nwrote {test_path}")


def main():
    ap = argparse.ArgumentParser(description="Generate the sample Chinese financial-news dataset.")
    ap.add_argument("--out-csv", default="data/sample_news.csv", help="training CSV path (text,label)")
    ap.add_argument("--out-test", default="data/sample_test.json", help="held-out JSON path")
    ap.add_argument("--per-class", type=int, default=130, help="CSV items per label")
    ap.add_argument("--test-per-class", type=int, default=6, help="held-out items per label")
    ap.add_argument("--seed", type=int, default=20261125, help="random seed")
    args = ap.parse_args()
    train, test = generate(args.per_class, args.test_per_class, args.seed)
    write_csv(train, args.out_csv)
    write_json(test, args.out_test)
    print("CSV rows per label:")
    summarize(train, test, args.out_csv, args.out_test)


if __name__ == "__main__":
    main()
